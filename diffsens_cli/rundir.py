"""The self-describing run directory: resolved config, arrays, figures, summary.json.

Every file is written to a temporary name and renamed into place, so an interrupted
run never leaves a half-written file behind; ``summary.json`` is written last and
marks a finished run.  Finished intermediate results (``stage``) are reused when a
run is restarted into the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

import diffsens_cli

ArrayDict = dict[str, np.ndarray]


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """One run's output directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def save_config(self, cfg: DictConfig) -> None:
        """The fully resolved config the run used."""
        text = OmegaConf.to_yaml(cfg, resolve=True)
        _atomic_write(self.path / "config.yaml", lambda f: f.write(text), "w")

    def save_arrays(self, name: str, arrays: ArrayDict) -> Path:
        path = self.path / f"{name}.npz"
        _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return path

    def stage(self, name: str, compute: Callable[[], ArrayDict], depends: Any = None) -> ArrayDict:
        """``stages/<name>-<hash of depends>.npz`` if an earlier attempt finished it, else
        ``compute()`` and save it: a restarted run redoes only unfinished stages."""
        digest = hashlib.sha256(json.dumps(depends, sort_keys=True, default=str).encode()).hexdigest()[:10]
        path = self.path / "stages" / f"{name}-{digest}.npz"
        if path.exists():
            with np.load(path) as f:
                return dict(f)
        start = time.perf_counter()
        arrays = compute()
        self.timings[name] = time.perf_counter() - start
        _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return arrays

    def save_figure(self, fig, name: str) -> list[str]:
        """``name.png`` and ``name.pdf``."""
        out = []
        for ext in ("png", "pdf"):
            path = self.path / f"{name}.{ext}"
            _atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=150, bbox_inches="tight"))
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
        _atomic_write(path, lambda f: f.write(text + "\n"), "w")
        return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
