"""What the benchmarks measure with: wall seconds of a call (synchronised on a GPU), the
median over repeats after a warm-up, and the peak memory a call adds."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes (synchronised on a GPU)."""

    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def median_seconds(device: torch.device, fn: Callable[[], object], repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    timed = timer(device)
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def peak_memory(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Bytes ``fn`` needs at its peak beyond what was in use before: CUDA's allocator peak,
    or on Linux the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
    over its resident set before; None where neither can be read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    try:
        _release_free_memory()
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        fn()
        return max(0, (_status_kb("VmHWM") - before) * 1024)
    except OSError:
        return None


def _release_free_memory() -> None:
    """Hand memory freed by earlier work back to the system (glibc keeps it resident, where
    a later peak would reuse it unseen)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak is then a lower bound
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
