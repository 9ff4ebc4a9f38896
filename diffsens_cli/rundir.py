"""The self-describing run directory: resolved config, arrays, figures, summary.json.

Every file is written to a temporary name and renamed into place, so an interrupted
run never leaves a half-written file behind; ``summary.json`` is written last and
marks a finished run.  Finished intermediate results are stages of the shared
``StageCache`` (``stages.py``): a restarted run, or another run that shares a stage,
reuses them.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

import diffsens_cli
from diffsens_cli.stages import ArrayDict, StageCache, atomic_write


class RunDir:
    """One run's output directory."""

    def __init__(self, path: str | Path, cache: StageCache | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cache = cache or StageCache(self.path / "stages")
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def save_config(self, cfg: DictConfig) -> None:
        """The fully resolved config the run used."""
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(self.path / "config.yaml", lambda f: f.write(text), "w")

    def save_arrays(self, name: str, arrays: ArrayDict) -> Path:
        path = self.path / f"{name}.npz"
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return path

    def stage(self, name: str, compute: Callable[[], ArrayDict], depends: Any = None) -> ArrayDict:
        """The arrays of stage ``name`` for ``depends``: from the stage cache if an earlier
        run finished it, else ``compute()``, saved there."""
        start = time.perf_counter()
        arrays = self.cache.arrays(name, depends, compute)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return arrays

    def save_figure(self, fig, name: str) -> list[str]:
        """``name.png`` and ``name.pdf``."""
        out = []
        for ext in ("png", "pdf"):
            path = self.path / f"{name}.{ext}"
            atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=150, bbox_inches="tight"))
            out.append(path.name)
        return out

    def write_summary(self, metrics: dict[str, Any], **extra: Any) -> Path:
        """Write ``summary.json`` last: headline metrics, timings and the environment."""
        import torch

        summary = {
            "metrics": metrics,
            **extra,
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "stage_times_s": {k: round(v, 3) for k, v in self.timings.items()},
            "stages": self.cache.log,
            "versions": {
                "diffsens": diffsens_cli.__version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
            "command": " ".join(sys.argv),
        }
        text = json.dumps(summary, indent=2, default=_json_default)
        path = self.path / "summary.json"
        atomic_write(path, lambda f: f.write(text + "\n"), "w")
        return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
