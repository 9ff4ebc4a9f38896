"""Pipelines orchestrate one experiment each: build components, integrate, save, plot.

Each module ``diffsens_cli.pipelines.<task>`` has ``run(cfg, run_dir)``, and may have
``check(cfg)``, the checks the CLI runs before a run directory exists (default: build
the synthetic ``Components``).
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from diffsens_cli.errors import one_of
from diffsens_cli.rundir import RunDir

TASK_NAMES = ("bench_engine", "first_order", "score_error", "toy2d", "train")


def check_task(cfg: DictConfig) -> None:
    """Check ``cfg`` for its task without doing the work; raises a DiffsensError."""
    task = one_of(cfg.task, TASK_NAMES, "task")
    module = importlib.import_module(f"diffsens_cli.pipelines.{task}")
    if hasattr(module, "check"):
        module.check(cfg)
    else:
        from diffsens_cli.builders import Components

        Components(cfg)


def run_task(cfg: DictConfig, out_dir: str) -> None:
    """Run ``cfg.task`` into ``out_dir``; writes the resolved config first."""
    task = one_of(cfg.task, TASK_NAMES, "task")
    run = RunDir(out_dir)
    run.save_config(cfg)
    importlib.import_module(f"diffsens_cli.pipelines.{task}").run(cfg, run)
