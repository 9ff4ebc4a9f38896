"""What several test modules share: the experiments and their tiny settings, and the
command line run in this process (``diffsens``) or in a process of its own."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

from diffsens_cli.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))

# Smoke-sized runs of the real pipelines: each experiment's tiny settings
# (configs/experiment_size/), and the fake data of the fixture ("{data}") for those that read files.
DATA_ROOTS = {
    "mnist_tmnist": ["dataset.root={data}/mnist", "perturbation.source.root={data}/tmnist"],
    "celeba_oldman": ["dataset.root={data}/celeba"],
    "celeba_attributes_paper": ["dataset.root={data}/celeba"],
    "celeba_influence": ["dataset.root={data}/celeba"],
    "mnist_counterfactual": ["dataset.root={data}/mnist"],
    "cifar10_crossclass": ["dataset.root={data}/cifar10", "model.path={data}/cifar10_model"],
}
TINY = {e: ["size=tiny", *DATA_ROOTS.get(e, [])] for e in EXPERIMENTS}

def diffsens(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``diffsens <args>`` run in this process from ``cwd``: what a subprocess would give
    (exit status, stdout, stderr) without an interpreter start-up, which costs about 4 s
    with torch and diffusers. Real processes are kept for what needs one (signals, a shell's view)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    status = 0
    try:
        with contextlib.chdir(cwd), mock.patch.dict(os.environ, {"HYDRA_FULL_ERROR": "0"}), \
                mock.patch.object(sys, "argv", sys.argv), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            main(list(args))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["diffsens", *args], status, stdout.getvalue(), stderr.getvalue())


def diffsens_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``diffsens <args>`` in a process of its own, as a shell runs it."""
    return subprocess.run([sys.executable, "-m", "diffsens_cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=600)
