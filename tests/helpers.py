"""What several test modules share: the experiments and their tiny settings, and the
command line run in this process (``diffsens``) or in a process of its own."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import solver_settings
from diffsens_cli.cli import main
from diffsens_cli.core.influence import InfluenceSettings
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.steppers import State
from diffsens_cli.pipelines.influence import influence_settings
from diffsens_cli.training.settings import TrainSettings, train_settings

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
    "own_influence": ["dataset.root={data}/own_images", "model.path={data}/own_pipeline"],
    "own_predict": ["dataset.root={data}/own_images", "model.path={data}/own_pipeline",
                    "perturbation.source.root={data}/own_S"],
}
TINY = {e: ["size=tiny", *DATA_ROOTS.get(e, [])] for e in EXPERIMENTS}


def _group(path: str, group: str, overrides: dict[str, Any], **root: Any) -> DictConfig:
    """configs/``path`` as the group ``group`` of a config holding ``root`` (the keys its
    interpolations name), with ``overrides`` merged into the group."""
    loaded = OmegaConf.load(REPO / "configs" / path)
    return OmegaConf.merge(OmegaConf.create({**root, group: loaded}), {group: overrides})


def solver_settings_with(**overrides: Any) -> SolverSettings:
    """The solver group's defaults (configs/solver/ode.yaml) with ``overrides``, read and
    checked as a run reads them: the settings' defaults live in the YAML only."""
    seed = overrides.pop("seed", 0)
    return solver_settings(_group("solver/ode.yaml", "solver", overrides, seed=seed).solver)


def influence_settings_with(**overrides: Any) -> InfluenceSettings:
    """The influence group's defaults (configs/influence/sketch.yaml) with ``overrides``."""
    seed = overrides.pop("seed", 0)
    return influence_settings(_group("influence/sketch.yaml", "influence", overrides, seed=seed))


def train_settings_with(**overrides: Any) -> TrainSettings:
    """The train group's defaults (configs/train/default.yaml, with solver=ode's t_min and
    the run's seed 0) with ``overrides``; ``steps`` must be among them (no epoch size here)."""
    cfg = _group("train/default.yaml", "train", overrides, seed=0, solver={"t_min": 1e-3, "progress": True})
    return train_settings(cfg.train, None)

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


def run_tiny(tmp_path: Path, name: str, experiment: str, *overrides: str) -> tuple[Path, dict]:
    """``experiment`` at tiny size into ``tmp_path/name`` (in this process, from
    ``tmp_path``): the run directory and its summary's metrics; a failure shows stderr."""
    out = tmp_path / name
    r = diffsens("run", f"experiment={experiment}", "size=tiny", f"hydra.run.dir={out}", "solver.progress=false",
                 *overrides, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())["metrics"]


def diffsens_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``diffsens <args>`` in a process of its own, as a shell runs it."""
    return subprocess.run([sys.executable, "-m", "diffsens_cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=600)


def watch_chunks(monkeypatch, integrator: Integrator, size: Callable[[State], int],
                 fail_above: float = math.inf) -> list[int]:
    """The ``size(state)`` of every chunk ``integrator`` goes on to integrate (its rows, or its
    tangents), in order; chunks larger than ``fail_above`` raise a simulated out-of-memory
    error instead."""
    real, seen = integrator._chunk, []

    def chunk(state: State, *args):
        seen.append(size(state))
        if seen[-1] > fail_above:
            raise torch.OutOfMemoryError("simulated")
        return real(state, *args)

    monkeypatch.setattr(integrator, "_chunk", chunk)
    return seen
