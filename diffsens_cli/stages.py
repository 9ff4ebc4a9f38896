"""The stage cache: finished pieces of work, shared by every run and every experiment.

An experiment is a sequence of stages (train a model, integrate sensitivities, solve
the OT baseline, ...).  Each stage lives in ``<root>/<name>/<key>/``, ``key`` a hash of
what the stage depends on (the config parts that change its result, and the keys of
the stages it reads), so a re-run, or another experiment with a stage in common,
finds it finished and reuses it; changing only a plot style retrains nothing.

A stage directory is finished when its ``done.json`` exists, written last and
atomically; it records the size and SHA-256 of every file of the stage.  A finished
stage is reused only when ``done.json`` lists exactly its files and every one passes
that check; one that fails (a truncated, replaced, unlisted or symlinked file, a
``done.json`` without checksums, a stage directory that is a symlink) is named in one
line, set aside
under ``<root>/.set-aside/`` (never deleted) and recomputed, or, in a cache this
process may not write, the run stops with one line saying how to recompute it.
Until it is finished, a stage directory is the stage's own business (a training stage
keeps its checkpoints there, so an interrupted stage resumes where it stopped).  A
stage that fails, or is interrupted, leaves no ``done.json``, and no stage directory
if it wrote nothing (only its lock file).  Reading a finished stage takes no lock, so a finished cache can
be shared read-only; two processes that compute the same stage (jobs of a sweep) take
turns through a lock file (``.KEY.lock`` beside the stage's directory, kept, since
removing it is not safe on NFS), so the second one reuses what the first one made.

The lock is ``flock``, which the kernel releases when its holder dies, however it dies:
a killed job never blocks the next one.  On NFS, Linux passes it to the server as a
POSIX lock, so it holds across nodes, unless the file system was mounted with locks
kept on the node (NFS ``nolock`` or ``local_lock=flock|all``, Lustre ``localflock``);
``lock_scope`` reads the mount table and the cache warns once when its locks are
local.  A file system without locks (Lustre without ``flock``) stops the stage in one
line.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from diffsens_cli import interrupt
from diffsens_cli.errors import DiffsensError, warn

ArrayDict = dict[str, np.ndarray]
DONE = "done.json"
SET_ASIDE = ".set-aside"
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_UNFINISHED = "it has no done.json"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary sibling and a rename: it is whole or absent.  It
    gets the permissions of a file opened as usual (mkstemp's own are 0600, which would
    hide a shared cache or report from the rest of the group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """This process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def nonfinite(arrays: ArrayDict) -> list[tuple[str, float, int]]:
    """(name, share of non-finite values, size) of each non-empty floating-point array in
    ``arrays`` that holds a NaN or an infinity."""
    out = []
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc" and value.size:
            share = 1.0 - float(np.isfinite(value).mean())
            if share > 0:
                out.append((key, share, int(value.size)))
    return out


def _partly_finite(name: str, arrays: ArrayDict, then: str) -> list[tuple[str, float, int]]:
    """``nonfinite(arrays)`` of stage ``name``; one line (``then`` says what follows) if an
    array has no finite value at all."""
    found = nonfinite(arrays)
    dead = [f"{key} ({size} values)" for key, share, size in found if share == 1]
    if dead:
        raise DiffsensError(f"stage {name}: every value of {', '.join(dead)} is NaN or infinite; {then} "
                            "(see the run's weights counts and the settings' scales)")
    return found


def stage_key(depends: Any) -> str:
    """A short, stable hash of ``depends`` (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(depends, sort_keys=True, default=str).encode()).hexdigest()[:12]


def content_key(array: np.ndarray) -> str:
    """A stage key of an array's content (a removal set's positions, query samples or images)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def file_stamp(path: Path) -> tuple[int, int]:
    """A file's size and modification time in ns: the quick check of make and rsync (a file
    rewritten in place with the same size within the file system's time resolution goes
    unseen), for a user's data files, whose hashes would cost a read of every byte."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``directory`` but its ``done.json``, by
    relative path; a stage keeps regular files only (anything else is refused on reuse)."""
    files, odd = _entries(directory)
    if odd:
        raise DiffsensError(f"{directory}: {odd[0]}; a stage keeps regular files only")
    return {name: {"size": (directory / name).stat().st_size, "sha256": file_digest(directory / name)}
            for name in sorted(files)}


def _entries(directory: Path) -> tuple[set[str], list[str]]:
    """The regular files under ``directory`` by relative path (its ``done.json`` aside),
    and what else is there but folders: symlinks (never followed) and special files."""
    files, odd = set(), []
    for root, dirs, names in os.walk(directory):  # symlinked folders are listed in dirs, not entered
        for name in dirs:
            if (Path(root) / name).is_symlink():
                odd.append(f"{(Path(root) / name).relative_to(directory).as_posix()} is a symlink")
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if path.is_symlink():
                odd.append(f"{relative} is a symlink")
            elif not path.is_file():
                odd.append(f"{relative} is not a regular file")
            elif relative != DONE:
                files.add(relative)
    return files, sorted(odd)


def verify(directory: Path) -> str | None:
    """Why the finished stage in ``directory`` cannot be trusted, or None if its
    ``done.json`` lists exactly the files in it (nothing missing, nothing extra, no
    symlinks), each with its recorded size and checksum."""
    if directory.is_symlink():
        return "the stage directory is a symlink"
    try:
        record = json.loads((directory / DONE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{DONE} is not readable JSON ({e})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return f"{DONE} records no checksums (an older diffsens wrote it)"
    present, odd = _entries(directory)
    if odd:
        return odd[0]
    if present - set(files):
        return f"{sorted(present - set(files))[0]} is not listed in {DONE}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} has {path.stat().st_size} bytes, {DONE} recorded {expected.get('size')}"
        if file_digest(path) != expected.get("sha256"):
            return f"{name} does not match its checksum in {DONE}"
    return None


def lock_scope(path: Path, mountinfo: str | None = None) -> str | None:
    """Why flock on ``path`` does not hold across nodes, read from the mount table
    (``/proc/self/mountinfo``), or None if it does or nothing says otherwise."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target, best = os.path.realpath(path), None  # a symlink to a network file system is on that file system
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # mountinfo escapes space, tab, \\
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3 or not (target == point or target.startswith(point.rstrip("/") + "/")):
            continue
        if best is None or len(point) >= len(best[0]):
            best = (point, after[0], set(fields[5].split(",")) | set(after[2].split(",")))
    if best is None:
        return None
    point, fstype, options = best
    if fstype.startswith("nfs"):
        local = [o for o in ("nolock", "local_lock=flock", "local_lock=all") if o in options]
        if local:
            return f"{fstype} at {point} is mounted with {local[0]}: its locks are local to this node"
    if fstype == "lustre" and "flock" not in options:
        what = "localflock: its locks are local to this node" if "localflock" in options else \
            "neither flock nor localflock: it has no locks"
        return f"lustre at {point} is mounted with {what}"
    return None


class StageCache:
    """Finished stages under ``root``; stage names in ``force`` (or ``"all"``) are
    recomputed once in this process, whatever was there."""

    def __init__(self, root: str | os.PathLike, force: Iterable[str] = ()):
        self.root = Path(root)
        self.force = set(force)
        # How non-finite values in a stage are told; a RunDir sets its own, which keeps them in the summary.
        self.warn: Callable[[str], None] = warn
        self.forced: set[Path] = set()
        self.log: list[dict[str, Any]] = []  # what this process did, stage by stage
        # Seconds spent getting each stage (computing or reusing it), less the stages it needed inside.
        self.timings: dict[str, float] = {}
        self._inner: list[float] = []
        self._scope_checked = False

    def path(self, name: str, depends: Any) -> Path:
        return self.root / name / stage_key(depends)

    def is_done(self, name: str, depends: Any) -> bool:
        path = self.path(name, depends)
        return not path.is_symlink() and (path / DONE).is_file()

    def run(self, name: str, depends: Any, work: Callable[[Path], None]) -> Path:
        """The directory of stage ``name`` for ``depends``: reused if finished and intact,
        else ``work(directory)`` fills it (picking up what an interrupted attempt left) and
        ``done.json`` marks it finished."""
        with self._timed(name):
            return self._run(name, depends, work)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Adds the seconds inside to ``timings[name]``, less those of stages run inside it."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed, inner = time.perf_counter() - start, self._inner.pop()
            self.timings[name] = self.timings.get(name, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed

    def _run(self, name: str, depends: Any, work: Callable[[Path], None]) -> Path:
        path = self.path(name, depends)
        forcing = (name in self.force or "all" in self.force) and path not in self.forced
        problem = None if forcing else self._problem(path)
        if not forcing and problem is None:  # no lock: a read-only cache serves finished stages
            return self._reused(name, path)
        with self._locked(name, path, problem):
            if forcing:
                if path.is_symlink():
                    path.unlink()  # the link, never what it points to
                shutil.rmtree(path, ignore_errors=True)
                self.forced.add(path)
            else:
                problem = self._problem(path)  # again: another process may have finished it meanwhile
                if problem is None:
                    return self._reused(name, path)
                if problem != _UNFINISHED:
                    self._set_aside(name, path, problem)
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                with interrupt.doing(f"stage {name} ({path})"):
                    work(path)
            except BaseException:
                if created and not any(path.iterdir()):
                    path.rmdir()  # it wrote nothing: leave nothing behind
                raise
            seconds = time.perf_counter() - start
            record = {"stage": name, "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "depends": depends, "files": checksums(path)}
            atomic_write(path / DONE, lambda f: f.write(json.dumps(record, indent=1, default=str) + "\n"), "w")
            self.log.append({"stage": name, "key": path.name, "path": str(path), "reused": False,
                             "seconds": round(seconds, 3)})
            return path

    def arrays(self, name: str, depends: Any, compute: Callable[[], ArrayDict]) -> ArrayDict:
        """A stage whose result is a dict of arrays (``arrays.npz``, read without pickles).

        A result with an array of numbers none of which is finite is refused before it is
        kept (one line naming the stage and the array); one with some non-finite values
        is kept and told, with their share, each time it is used."""

        def work(path: Path) -> None:
            arrays = compute()
            _partly_finite(name, arrays, "nothing was kept")
            atomic_write(path / "arrays.npz", lambda f: np.savez_compressed(f, **arrays))

        path = self.run(name, depends, work)
        try:
            with np.load(path / "arrays.npz", allow_pickle=False) as f:
                arrays = dict(f)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # checked, yet unreadable
            raise DiffsensError(f"stage {name}/{path.name}: {path / 'arrays.npz'} is unreadable ({e}); "
                                f"recompute it with stages.force=[{name}]") from None
        for key, share, size in _partly_finite(name, arrays, "an older diffsens kept it: recompute it with "
                                               f"stages.force=[{name}]"):
            self.warn(f"stage {name}: {share:.1%} of the {size} values of {key} are NaN or infinite")
        return arrays

    # -- checks ------------------------------------------------------------------------
    @staticmethod
    def _problem(path: Path) -> str | None:
        """None if the stage in ``path`` is finished and passes its check, else why not
        (a symlink is never written through, finished or not)."""
        if path.is_symlink():
            return "the stage directory is a symlink"
        return verify(path) if (path / DONE).is_file() else _UNFINISHED

    def _set_aside(self, name: str, path: Path, problem: str) -> None:
        """Move a finished stage that fails its check out of the way, whole (under its lock)."""
        aside = self.root / SET_ASIDE / name / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
        warn(f"stage {name}/{path.name} ({path}) fails its check: {problem}; set aside as {aside}, recomputing")

    def _reused(self, name: str, path: Path) -> Path:
        entry = {"stage": name, "key": path.name, "path": str(path), "reused": True}
        if entry not in self.log:  # a stage read twice in one run is listed once
            self.log.append(entry)
        return path

    # -- taking turns ------------------------------------------------------------------
    def _check_scope(self) -> None:
        """Warn once if this cache's locks do not hold across nodes."""
        if not self._scope_checked:
            self._scope_checked = True
            problem = lock_scope(self.root)
            if problem:
                warn(f"stages.dir: {self.root}: {problem}, so jobs on two nodes could compute one stage at "
                     f"once; run a sweep's jobs on one node, or put stages.dir on a file system with shared locks")

    @contextmanager
    def _locked(self, name: str, path: Path, problem: str | None) -> Iterator[None]:
        """Hold the lock file of ``path``.  The file is kept after release: removing it would
        let a waiter on another NFS client, whose cached directory entry still names the old
        file, lock it while a newcomer locks a new one.  In a cache this process may not
        write, stop in one line saying why the stage is needed."""
        lock_path = path.parent / f".{path.name}.lock"
        while True:
            try:
                lock_path.parent.mkdir(parents=True, exist_ok=True)
                lock = open(lock_path, "a")  # noqa: SIM115 (held across the yield, closed in finally)
            except FileNotFoundError:  # the folder was removed meanwhile (by hand, or an older version): again
                continue
            except OSError as e:
                if e.errno not in _READ_ONLY:
                    raise
                if problem not in (None, _UNFINISHED):
                    raise DiffsensError(f"stage {name}/{path.name} ({path}) fails its check: {problem}; the cache "
                                        f"is not writable ({e.strerror}), so recompute it into another cache: "
                                        f"stages.dir=DIR stages.force=[{name}]") from None
                raise DiffsensError(f"stages.dir: cannot compute stage {name}: {self.root} is not writable "
                                    f"({e.strerror}); finished stages are read from a read-only cache, but "
                                    f"new ones need stages.dir set to a writable folder") from None
            if self._holds(lock, lock_path):
                break
            lock.close()  # the file was removed or replaced while we waited (not by this version): again
        try:
            yield
        finally:
            lock.close()

    def _holds(self, lock: IO[str], lock_path: Path) -> bool:
        """Lock ``lock`` (waiting for its holder), and say whether it is still the file at
        ``lock_path``, so that the lock is the one every other process takes."""
        self._check_scope()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            lock.close()
            if e.errno not in _NO_LOCKS:
                raise
            raise DiffsensError(f"stages.dir: {self.root} has no file locks ({e.strerror}), which the stage "
                                f"cache needs; put it on a file system that has them (a local disk, NFS, "
                                f"Lustre mounted with flock)") from None
        try:
            return os.path.samestat(os.fstat(lock.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            return False
