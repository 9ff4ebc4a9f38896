"""The self-describing run directory: resolved config, arrays, figures, summary.json.

Every file is written to a temporary name and renamed into place, so an interrupted
run never leaves a half-written file behind; ``summary.json`` is written last and
marks a finished run.  It is strict JSON (no bare ``NaN``/``Infinity``, which JavaScript's
``JSON.parse`` and ``jq`` reject): a non-finite number is written as ``null`` and its
dotted path listed, with what it was and why, under ``null_values``.  Finished
intermediate results are stages of the shared ``StageCache`` (``stages.py``): a restarted
run, or another run that shares a stage, reuses them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig, OmegaConf

import diffsens_cli
from diffsens_cli import threads
from diffsens_cli.errors import warn
from diffsens_cli.stages import ArrayDict, StageCache, atomic_write, nonfinite


class RunDir:
    """One run's output directory."""

    def __init__(self, path: str | Path, cache: StageCache | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cache = cache or StageCache(self.path / "stages")
        self.cache.warn = self.warn  # a stage's non-finite values are the run's warnings too
        self.started = time.perf_counter()
        self.warnings: list[str] = []

    def save_config(self, cfg: DictConfig) -> None:
        """The fully resolved config the run used."""
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(self.path / "config.yaml", lambda f: f.write(text), "w")

    def save_arrays(self, name: str, arrays: ArrayDict) -> Path:
        """``name.npz``; an array none of whose values is finite is told (some NaN are
        expected: a correlation of constant values, an unfilled cell of a table)."""
        for key, share, size in nonfinite(arrays):
            if share == 1:
                self.warn(f"{name}.npz: every one of the {size} values of {key} is NaN or infinite")
        path = self.path / f"{name}.npz"
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return path

    def save_table(self, name: str, header: list[str], rows: list[Sequence[Any]]) -> str:
        """``name.csv`` (``name`` may hold a subfolder): a header line and one line per row,
        as the csv module writes them; the path relative to the run directory."""
        path = self.path / f"{name}.csv"

        def write(f) -> None:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(header)
            out.writerows(rows)

        atomic_write(path, write, "w")
        return path.relative_to(self.path).as_posix()

    def save_image(self, name: str, image: np.ndarray) -> str:
        """``name.png`` (``name`` may hold a subfolder): one image [C, H, W] in [-1, 1] as a
        thumbnail (``plots.common.thumbnail``); the path relative to the run directory."""
        from diffsens_cli.plots.common import thumbnail

        path = self.path / f"{name}.png"
        atomic_write(path, lambda f: thumbnail(image).save(f, format="PNG"))
        return path.relative_to(self.path).as_posix()

    def save_figure(self, fig, name: str) -> list[str]:
        """``name.png`` and ``name.pdf``; the figure is closed afterwards (pyplot keeps every
        open figure, and a sweep's jobs share one process)."""
        out = []
        for ext in ("png", "pdf"):
            path = self.path / f"{name}.{ext}"
            atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=150, bbox_inches="tight"))
            out.append(path.name)
        plt.close(fig)
        return out

    def warn(self, message: str) -> None:
        """Tell the user of a degenerate result: one line on stderr, kept in the summary's ``warnings``."""
        warn(message)
        self.warnings.append(message)

    def warn_if_zero_psi(self, psi: np.ndarray | list[np.ndarray], weights: dict[str, int]) -> None:
        """Warn when every sensitivity ``psi`` is exactly zero, saying what the ``weights``
        counts (``WeightStats.as_dict``) tell of why: usually every nu_t/rho_t underflowed."""
        parts = psi if isinstance(psi, list) else [psi]
        if any(np.any(p != 0) for p in parts):
            return
        dtype = np.result_type(*parts)
        n, under, bad = weights.get("evaluated", 0), weights.get("underflow", 0), weights.get("nonfinite", 0)
        if under and under == n:
            why = f"all {n} weights nu/rho underflowed in {dtype}"
        elif bad and bad == n:
            why = f"all {n} log weights log(nu/rho) were NaN or infinite in {dtype} (a log-density overflowed)"
        elif under or bad:
            why = f"{under} of {n} weights nu/rho underflowed in {dtype} and {bad} were NaN or infinite"
        else:
            why = f"no weight nu/rho underflowed: nu's score equals rho's where nu/rho > 0 ({n} weights)"
        if not (under or bad):
            advice = ""
        elif dtype == np.float64:  # already the widest dtype: nu is too far from the samples
            advice = "; nu is beyond float64's range from the samples: check the perturbation's scale"
        else:
            advice = "; use solver.dtype=float64 or a perturbation nearer the data"
        self.warn(f"psi is identically zero: {why}{advice}")

    def write_summary(self, metrics: dict[str, Any], reasons: dict[str, str] | None = None, **extra: Any) -> Path:
        """Write ``summary.json`` last: headline metrics, timings and the environment; then
        ``index.html``, a page of the run's figures and numbers (``report.py``).

        ``reasons`` says why a value may be non-finite, by the path (``dotted``) that
        ``null_values`` lists it under, e.g. ``metrics.retrain.median_corr``."""
        import torch

        from diffsens_cli.report import write_run_index

        summary = {
            "metrics": metrics,
            **extra,
            "warnings": self.warnings,
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "stage_times_s": {k: round(v, 3) for k, v in self.cache.timings.items()},
            "stages": self.cache.log,
            "versions": {
                "diffsens": diffsens_cli.__version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
            "command": " ".join(sys.argv),
            "threads": threads.describe(),
            "process": {"host": platform.node(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
        }
        nulls: dict[str, str] = {}
        summary = _finite_json(summary, (), nulls)
        if nulls:
            summary["null_values"] = {k: f"{v}: {reasons[k]}" if reasons and k in reasons else v
                                      for k, v in nulls.items()}
        text = json.dumps(summary, indent=2, allow_nan=False)
        path = self.path / "summary.json"
        atomic_write(path, lambda f: f.write(text + "\n"), "w")
        write_run_index(self.path)
        return path


def _finite_json(x: Any, path: tuple[str | int, ...], nulls: dict[str, str]) -> Any:
    """``x`` as plain JSON values (numpy scalars and arrays too), every non-finite float
    replaced by ``None`` and recorded in ``nulls`` as ``{dotted(*path): "NaN" | "+inf" | "-inf"}``."""
    if isinstance(x, np.ndarray | np.generic):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _finite_json(v, (*path, str(k)), nulls) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_json(v, (*path, i), nulls) for i, v in enumerate(x)]
    if isinstance(x, float) and not math.isfinite(x):
        nulls[dotted(*path)] = "NaN" if math.isnan(x) else "+inf" if x > 0 else "-inf"
        return None
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise TypeError(f"{dotted(*path)}: not JSON serialisable: {type(x).__name__}")


def dotted(*keys: str | int) -> str:
    """The path of a value in the summary, as ``null_values`` and ``write_summary``'s ``reasons``
    name it: ``metrics.retrain.median_corr``; a list index as ``[2]``, a key that holds a dot,
    bracket or quote as ``["ode/step 0.05"]``."""
    out = ""
    for k in keys:
        if isinstance(k, int):
            out += f"[{k}]"
        elif any(c in k for c in '.[]"'):
            out += f"[{json.dumps(k)}]"
        else:
            out += f".{k}" if out else k
    return out
