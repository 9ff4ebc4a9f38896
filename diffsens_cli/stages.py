"""The stage cache: finished pieces of work, shared by every run and every experiment.

An experiment is a sequence of stages (train a model, integrate sensitivities, solve
the OT baseline, ...).  Each stage lives in ``<root>/<name>/<key>/``, ``key`` a hash of
what the stage depends on (the config parts that change its result, and the keys of
the stages it reads), so a re-run, or another experiment with a stage in common,
finds it finished and reuses it; changing only a plot style retrains nothing.

A stage directory is finished when its ``done.json`` exists, written last and
atomically; everything else in it is the stage's own business (a training stage keeps
its checkpoints there, so an interrupted stage resumes where it stopped, and never
trusts a half-written file).  A stage that fails, or is interrupted, leaves no
``done.json``.  Two processes that need the same stage (jobs of a sweep) take turns
through a lock file, so the second one reuses what the first one made.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ArrayDict = dict[str, np.ndarray]
DONE = "done.json"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary sibling and a rename: it is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stage_key(depends: Any) -> str:
    """A short, stable hash of ``depends`` (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(depends, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StageCache:
    """Finished stages under ``root``; stage names in ``force`` (or ``"all"``) are
    recomputed once in this process, whatever was there."""

    def __init__(self, root: str | os.PathLike, force: Iterable[str] = ()):
        self.root = Path(root)
        self.force = set(force)
        self.forced: set[Path] = set()
        self.log: list[dict[str, Any]] = []  # what this process did, stage by stage

    def path(self, name: str, depends: Any) -> Path:
        return self.root / name / stage_key(depends)

    def is_done(self, name: str, depends: Any) -> bool:
        return (self.path(name, depends) / DONE).is_file()

    def run(self, name: str, depends: Any, work: Callable[[Path], None]) -> Path:
        """The directory of stage ``name`` for ``depends``: reused if finished, else
        ``work(directory)`` fills it (picking up what an interrupted attempt left) and
        ``done.json`` marks it finished."""
        path = self.path(name, depends)
        with self._locked(path):
            if (name in self.force or "all" in self.force) and path not in self.forced:
                shutil.rmtree(path, ignore_errors=True)
                self.forced.add(path)
            if (path / DONE).is_file():
                entry = {"stage": name, "key": path.name, "path": str(path), "reused": True}
                if entry not in self.log:  # a stage read twice in one run is listed once
                    self.log.append(entry)
                return path
            path.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            work(path)
            seconds = time.perf_counter() - start
            record = {"stage": name, "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "depends": depends}
            atomic_write(path / DONE, lambda f: f.write(json.dumps(record, indent=1, default=str) + "\n"), "w")
            self.log.append({"stage": name, "key": path.name, "path": str(path), "reused": False,
                             "seconds": round(seconds, 3)})
            return path

    def arrays(self, name: str, depends: Any, compute: Callable[[], ArrayDict]) -> ArrayDict:
        """A stage whose result is a dict of arrays (``arrays.npz``)."""

        def work(path: Path) -> None:
            arrays = compute()
            atomic_write(path / "arrays.npz", lambda f: np.savez_compressed(f, **arrays))

        path = self.run(name, depends, work)
        with np.load(path / "arrays.npz") as f:
            return dict(f)

    @contextmanager
    def _locked(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
