"""Each job computes with the CPUs it was given, not with every core of the node.

torch starts one intra-op thread per core it can see.  Two jobs on one node then run
twice as many threads as there are cores, and each step waits on threads that are not
running: on a 2-core machine two jobs took 4x as long per sensitivity step as one alone
(experiments/bench_threads.py), and whole runs were seen 20x slower.
A job's share is read, in this order, from the Hydra launcher's ``cpus_per_task`` (what
a sweep's jobs were given: submitit's local executor sets no variable, and inside a
Slurm allocation its jobs inherit the allocation's ``SLURM_CPUS_PER_TASK``), from Slurm
(``SLURM_CPUS_PER_TASK``: a plain ``diffsens run`` in a batch script), and from
``OMP_NUM_THREADS`` (its first number); without any, torch keeps its default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from diffsens_cli.errors import DiffsensError

# Where the thread count came from, in the order it is looked for.
SOURCES = ("hydra.launcher.cpus_per_task", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")

_configured: dict[str, Any] = {}


def cpus_given(launcher_cpus: Any = None, environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """The number of CPUs this job was given and where that was read, or None if nothing says."""
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").split(",")[0]  # "4,2": 4 threads at the outer level
    values = (launcher_cpus, environ.get("SLURM_CPUS_PER_TASK"), omp)
    for source, value in zip(SOURCES, values):
        if value is None or value == "":
            continue
        try:
            count = int(value)
        except (TypeError, ValueError):
            count = 0
        if count < 1:
            raise DiffsensError(f"{source}={value!r}: not a positive whole number of CPUs")
        return count, source
    return None


def configure(launcher_cpus: Any = None) -> dict[str, Any]:
    """Set torch's intra-op threads to the CPUs this job was given; returns what
    ``describe`` reports (and summary.json records)."""
    import torch

    given = cpus_given(launcher_cpus)
    if given is not None:
        torch.set_num_threads(given[0])
    _configured.clear()
    _configured.update(threads=torch.get_num_threads(), source=given[1] if given else "torch default",
                       visible_cpus=visible_cpus())
    return describe()


def visible_cpus() -> int:
    """The cores this process may run on (all of them where the OS has no affinity call)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe() -> dict[str, Any]:
    """The thread count of this process and where it came from."""
    import torch

    return dict(_configured) or {"threads": torch.get_num_threads(), "source": "torch default (not configured)",
                                 "visible_cpus": visible_cpus()}
