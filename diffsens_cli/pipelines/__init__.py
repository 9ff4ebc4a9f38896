"""Pipelines orchestrate one experiment each: build components, integrate, save, plot.

Each module ``diffsens_cli.pipelines.<task>`` has ``run(cfg, run_dir)``, and may have
``check(cfg)``, the checks the CLI runs before a run directory exists (default: build
the synthetic ``Components``), ``check_run_dir(cfg, path)``, the checks of what an
existing run directory holds (checkpoints to resume), and ``STAGES``, the names of its
cached stages (what ``stages.force`` may name).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffsens_cli.errors import one_of, require, whole
from diffsens_cli.rundir import RunDir
from diffsens_cli.sharding import Shard
from diffsens_cli.stages import StageCache

TASK_NAMES = ("attribute_sensitivity", "bench_engine", "bench_influence", "bench_paper_scale", "bench_train",
              "counterfactual", "first_order", "fisher_ot", "fisher_trace", "gtv_naive_sampler", "gtv_proxy_variance",
              "gtv_variance_prediction", "influence", "predict_change", "psi_convergence", "score_error", "toy2d",
              "train")

# The tasks that integrate image networks, where solver.network_dtype may be set (docs/accuracy.md).
HALF_PRECISION_TASKS = ("attribute_sensitivity", "bench_influence", "counterfactual", "influence", "predict_change",
                        "psi_convergence")
# The tasks whose per-sample stages split over jobs (shard.index, shard.count).
SHARDED_TASKS = ("attribute_sensitivity", "counterfactual", "influence", "predict_change")
MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take it, with room for the seeds derived from it
MAX_NAME = 100  # characters of a run's name, the folder it runs in


def check_task(cfg: DictConfig, run_dir: str | Path | None = None) -> None:
    """Check ``cfg`` for its task without doing the work, and, given the run directory,
    what is already there (``check_run_dir``); raises a DiffsensError."""
    task = one_of(cfg.task, TASK_NAMES, "task")
    seed = whole(cfg.seed, "seed")
    require(0 <= seed <= MAX_SEED, "seed", f"must be in 0 .. {MAX_SEED}, got {seed}")
    _check_name(cfg.name)
    require(not Shard.of(cfg).partial or task in SHARDED_TASKS, "shard.count",
            f"the task {task} of {cfg.name} does not split over jobs (these do: {', '.join(SHARDED_TASKS)})")
    module = importlib.import_module(f"diffsens_cli.pipelines.{task}")
    _stage_cache(cfg, getattr(module, "STAGES", ()))
    _check_network_dtype(cfg, task)
    if hasattr(module, "check"):
        module.check(cfg)
    else:
        from diffsens_cli.builders import Components

        Components(cfg)
    if run_dir is not None and hasattr(module, "check_run_dir"):
        module.check_run_dir(cfg, Path(run_dir))


def _check_network_dtype(cfg: DictConfig, task: str) -> None:
    """``solver.network_dtype`` is a valid setting, and set only where a task integrates an
    image network (elsewhere it would be ignored)."""
    from diffsens_cli.builders import network_precision

    require(network_precision(cfg.solver) is None or task in HALF_PRECISION_TASKS, "solver.network_dtype",
            f"half-precision network evaluations are for the tasks that integrate image networks "
            f"({', '.join(HALF_PRECISION_TASKS)}); {task} runs in solver.dtype (set it to null)")


def _check_name(name: object) -> None:
    """``name`` names the run's folder under outputs/: one plain folder name."""
    text = str(name)
    require(0 < len(text) <= MAX_NAME and "/" not in text and "\\" not in text and text not in (".", ".."),
            "name", f"must be a folder name of 1 to {MAX_NAME} characters without '/' (not '.' or '..'), "
            f"got {text[:40] + '...' if len(text) > 40 else text!r}")


def run_task(cfg: DictConfig, out_dir: str) -> None:
    """Run ``cfg.task`` into ``out_dir``; writes the resolved config first, after the
    pipeline's ``check_run_dir(cfg, run_dir)`` if it has one (checks of what the run
    directory already holds, e.g. that checkpoints there match the config, so a refused
    run leaves it as it was; the CLI runs it before Hydra writes anything)."""
    task = one_of(cfg.task, TASK_NAMES, "task")
    module = importlib.import_module(f"diffsens_cli.pipelines.{task}")
    if hasattr(module, "check_run_dir"):
        module.check_run_dir(cfg, Path(out_dir))
    run = RunDir(out_dir, _stage_cache(cfg, getattr(module, "STAGES", ())))
    run.save_config(cfg)
    module.run(cfg, run)


def _stage_cache(cfg: DictConfig, names: tuple[str, ...]) -> StageCache:
    """The shared stage cache of ``cfg.stages``; ``force`` may name the task's stages or ``all``."""
    force = OmegaConf.to_container(cfg.stages.force) if cfg.stages.force is not None else []
    force = [force] if isinstance(force, str) else force
    for name in force:
        one_of(name, (*names, "all"), "stages.force")
    root = Path(str(cfg.stages.dir)).expanduser()
    require(not root.exists() or root.is_dir(), "stages.dir", f"{root} exists and is not a folder")
    return StageCache(str(cfg.stages.dir), force)
