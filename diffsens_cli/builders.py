"""From config groups to objects: schedules, measures, score models, solver settings.

Every builder checks the values it reads and raises a ConfigError naming the key, so
a bad config fails before any work (the CLI runs these checks before Hydra starts a
run directory).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffsens_cli.core.integrate import Perturbation, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import SCHEDULES, Schedule
from diffsens_cli.errors import ConfigError, one_of, require
from diffsens_cli.models.base import ScoreModel
from diffsens_cli.models.closed_form import MixtureScore
from diffsens_cli.models.unet import build_network_model
from diffsens_cli.training.settings import TrainSettings

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _plain(x):
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def build_schedule(cfg: DictConfig) -> Schedule:
    kind = one_of(cfg.kind, sorted(SCHEDULES), "schedule.kind")
    kwargs = {k: v for k, v in _plain(cfg).items() if k != "kind"}
    try:
        return SCHEDULES[kind](**kwargs)
    except TypeError as e:
        raise ConfigError("schedule", f"bad keys for kind {kind!r}: {e}") from None


def _points(value, dim: int, key: str) -> torch.Tensor:
    """A list of points, each a scalar (that value in every coordinate) or ``dim`` values."""
    value = _plain(value)
    if not isinstance(value, list):
        value = [value]
    rows = []
    for i, v in enumerate(value):
        if isinstance(v, (int, float)):
            rows.append([float(v)] * dim)
        else:
            require(isinstance(v, list) and len(v) == dim, f"{key}[{i}]",
                    f"needs a scalar or {dim} values (the dataset's dim), got {v!r}")
            rows.append([float(x) for x in v])
    return torch.tensor(rows, dtype=torch.float64)


def _per_component(value, k: int, key: str, positive: bool = False) -> torch.Tensor:
    value = _plain(value)
    vals = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    require(len(vals) == k, key, f"needs one value or {k} (one per component), got {len(vals)}")
    require(all(v > 0 if positive else v >= 0 for v in vals), key,
            f"must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return torch.tensor(vals, dtype=torch.float64)


def _mixture(cfg: DictConfig, dim: int, group: str) -> GaussianMixture:
    means = _points(cfg.means, dim, f"{group}.means")
    k = means.shape[0]
    weights = _per_component(cfg.get("weights", 1.0), k, f"{group}.weights")
    require(weights.sum() > 0, f"{group}.weights", "must not all be zero")
    return GaussianMixture(means, _per_component(cfg.std, k, f"{group}.std"), weights)


def _curve(cfg: DictConfig) -> GaussianMixture:
    """Points along a planar curve with a small isotropic spread: rho 'on a curve'."""
    require(cfg.num_points >= 2, "dataset.num_points", f"must be >= 2, got {cfg.num_points}")
    s = torch.linspace(-1.0, 1.0, int(cfg.num_points), dtype=torch.float64)
    shape = one_of(cfg.shape, ["sine", "arc"], "dataset.shape")
    if shape == "sine":
        pts = torch.stack([1.5 * s, 0.6 * torch.sin(math.pi * s)], 1)
    else:
        pts = torch.stack([torch.cos(math.pi * (s + 1) / 2), torch.sin(math.pi * (s + 1) / 2)], 1)
    return GaussianMixture(pts, _per_component(cfg.std, pts.shape[0], "dataset.std"), torch.ones(pts.shape[0]))


def build_dataset(cfg: DictConfig) -> GaussianMixture:
    """The closed-form target measure rho of a synthetic data set."""
    kind = one_of(cfg.kind, ["gaussian_mixture", "curve"], "dataset.kind")
    require(int(cfg.dim) >= 1, "dataset.dim", f"must be >= 1, got {cfg.dim}")
    if kind == "curve":
        require(int(cfg.dim) == 2, "dataset.dim", "a curve data set lives in 2 dimensions")
        return _curve(cfg)
    return _mixture(cfg, int(cfg.dim), "dataset")


def build_perturbation(cfg: DictConfig, target: GaussianMixture, seed: int = 0) -> Perturbation:
    """The perturbation measure nu (closed form), with its sign (add or remove)."""
    dim = target.dim
    kind = one_of(cfg.kind, ["gaussian", "gaussian_mixture", "empirical"], "perturbation.kind")
    sign = one_of(cfg.get("direction", "add"), ["add", "remove"], "perturbation.direction")
    if kind == "gaussian":
        mean = _points([_plain(cfg.mean)], dim, "perturbation.mean")
        std = _per_component(cfg.std, 1, "perturbation.std", positive=True)
        measure = GaussianMixture(mean, std, torch.ones(1, dtype=torch.float64))
    elif kind == "gaussian_mixture":
        measure = _mixture(cfg, dim, "perturbation")
    else:
        measure = GaussianMixture.empirical(_empirical_points(cfg, target, seed))
    return Perturbation(measure, sign=1.0 if sign == "add" else -1.0)


def _empirical_points(cfg: DictConfig, target: GaussianMixture, seed: int) -> torch.Tensor:
    dim = target.dim
    if cfg.get("from_dataset") is not None:
        k = int(cfg.from_dataset)
        require(k >= 1, "perturbation.from_dataset", f"must be >= 1 samples, got {k}")
        return target.sample(k, torch.Generator().manual_seed(seed + 1))
    if cfg.get("path"):
        path = Path(cfg.path).expanduser()
        require(path.is_file(), "perturbation.path", f"no such file: {path} (expected a .npy or .txt array [K, {dim}])")
        arr = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
        pts = torch.as_tensor(arr, dtype=torch.float64).reshape(len(arr), -1)
        require(pts.shape[1] == dim, "perturbation.path", f"{path} holds points of dimension {pts.shape[1]}, "
                f"but the dataset has dim {dim}")
        return pts
    require(cfg.get("points") is not None, "perturbation.points",
            "an empirical perturbation needs points, path or from_dataset")
    return _points(cfg.points, dim, "perturbation.points")


def build_model(cfg: DictConfig, target: GaussianMixture, schedule: Schedule) -> ScoreModel:
    """The exact score of the synthetic target, or a network on its ``dim`` coordinates."""
    kind = one_of(cfg.kind, ["closed_form", "mlp", "pretrained"], "model.kind")
    if kind == "closed_form":
        return MixtureScore(target, schedule)
    return build_network_model(cfg, (target.dim,), schedule)


def solver_settings(cfg: DictConfig, model: ScoreModel | None = None) -> SolverSettings:
    """Checked ``SolverSettings`` from the ``solver`` group."""
    method = one_of(cfg.method, ["ode", "sde"], "solver.method")
    integrator = one_of(cfg.integrator, ["euler", "heun"], "solver.integrator")
    require(not (method == "sde" and integrator == "heun"), "solver.integrator",
            "the SDE is integrated with Euler-Maruyama: use integrator=euler with method=sde")
    if cfg.num_steps is None:
        require(cfg.step_size is not None and float(cfg.step_size) > 0, "solver.step_size",
                f"must be > 0, got {cfg.step_size}")
    else:
        require(int(cfg.num_steps) >= 1, "solver.num_steps", f"must be >= 1, got {cfg.num_steps}")
    require(0 < float(cfg.t_min) < 1, "solver.t_min", f"must be in (0, 1), got {cfg.t_min}")
    density = one_of(cfg.density, ["ccov", "closed_form"], "solver.density")
    require(not (method == "sde" and density == "ccov"), "solver.density",
            "CCoV log-densities hold along ODE paths only; an SDE run needs density=closed_form")
    if model is not None:
        require(density != "closed_form" or model.has_log_density, "solver.density",
                f"closed_form needs a model with a closed-form density; {type(model).__name__} has none (use ccov)")
    divergence = one_of(cfg.divergence, ["exact", "hutchinson"], "solver.divergence")
    require(int(cfg.hutchinson_samples) >= 1, "solver.hutchinson_samples",
            f"must be >= 1, got {cfg.hutchinson_samples}")
    clamp = _plain(cfg.weight_clamp)
    if clamp is not None:
        require(isinstance(clamp, list) and len(clamp) == 2 and 0 < clamp[0] < clamp[1], "solver.weight_clamp",
                f"must be null or [low, high] with 0 < low < high, got {clamp}")
        clamp = (float(clamp[0]), float(clamp[1]))
    require(cfg.batch_size is None or int(cfg.batch_size) >= 1, "solver.batch_size",
            f"must be null (as memory allows) or >= 1, got {cfg.batch_size}")
    return SolverSettings(
        method=method, integrator=integrator,
        step_size=None if cfg.step_size is None else float(cfg.step_size),
        num_steps=None if cfg.num_steps is None else int(cfg.num_steps),
        t_min=float(cfg.t_min), density=density, divergence=divergence,
        hutchinson_samples=int(cfg.hutchinson_samples),
        probe=one_of(cfg.probe, ["gaussian", "rademacher"], "solver.probe"),
        weight_clamp=clamp, batch_size=None if cfg.batch_size is None else int(cfg.batch_size),
        seed=int(cfg.seed), progress=bool(cfg.progress),
        record_every=None if cfg.get("record_every") is None else int(cfg.record_every),
        sde_sensitivity=one_of(cfg.sde_sensitivity, ["drift", "velocity"], "solver.sde_sensitivity"),
    )


def device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    dtype = DTYPES[one_of(cfg.dtype, sorted(DTYPES), "solver.dtype")]
    name = str(cfg.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), dtype
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("solver.device", f"{name!r} is not one of auto, cpu, cuda, cuda:N") from None
    require(device.type != "cuda" or torch.cuda.is_available(), "solver.device",
            f"{name!r} asked for, but torch {torch.__version__} sees no CUDA device (see README: GPU install)")
    return device, dtype


class Components:
    """Everything a pipeline builds from the config, checked: target rho, nu, the score
    model, the schedule, solver settings, device and dtype."""

    def __init__(self, cfg: DictConfig):
        self.device, self.dtype = device_and_dtype(cfg.solver)
        self.schedule = build_schedule(cfg.schedule)
        self.target = build_dataset(cfg.dataset)
        self.perturbation = build_perturbation(cfg.perturbation, self.target, int(cfg.seed))
        self.model = build_model(cfg.model, self.target, self.schedule)
        self.solver = solver_settings(cfg.solver, self.model)

    def on_device(self) -> Components:
        """Move measures and model to the run's device and dtype."""
        self.target = self.target.to(self.device, self.dtype)
        self.perturbation.measure = self.perturbation.measure.to(self.device, self.dtype)
        if isinstance(self.model, MixtureScore):
            self.model = MixtureScore(self.target, self.schedule)
        else:
            self.model.net.to(device=self.device, dtype=self.dtype)
        return self


TRAIN_MODES = ("base", "retrain", "finetune")


def train_settings(cfg: DictConfig, epoch_size: int | None) -> TrainSettings:
    """Checked ``TrainSettings`` from the ``train`` group; ``epoch_size`` is the number of
    training items one epoch passes over (None for an endless source such as a
    closed-form target, which needs ``train.steps``)."""
    one_of(cfg.mode, TRAIN_MODES, "train.mode")
    require(int(cfg.batch_size) >= 1, "train.batch_size", f"must be >= 1, got {cfg.batch_size}")
    if cfg.steps is not None:
        require(int(cfg.steps) >= 1, "train.steps", f"must be >= 1, got {cfg.steps}")
        steps = int(cfg.steps)
    else:
        require(epoch_size is not None, "train.steps", "an endless data source (a closed-form target) needs steps")
        require(cfg.epochs is not None and float(cfg.epochs) > 0, "train.epochs", f"must be > 0, got {cfg.epochs}")
        steps = max(1, math.ceil(float(cfg.epochs) * epoch_size / int(cfg.batch_size)))
    require(float(cfg.lr) > 0, "train.lr", f"must be > 0, got {cfg.lr}")
    lr_schedulers = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    one_of(cfg.lr_scheduler, lr_schedulers, "train.lr_scheduler")
    require(int(cfg.lr_warmup_steps) >= 0, "train.lr_warmup_steps", f"must be >= 0, got {cfg.lr_warmup_steps}")
    require(float(cfg.weight_decay) >= 0, "train.weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    require(cfg.ema_decay is None or 0 < float(cfg.ema_decay) < 1, "train.ema_decay",
            f"must be null or in (0, 1), got {cfg.ema_decay}")
    require(0 < float(cfg.eta_bar) < 1, "train.eta_bar", f"must be in (0, 1), got {cfg.eta_bar}")
    require(0 < float(cfg.t_min) < 1, "train.t_min", f"must be in (0, 1), got {cfg.t_min}")
    require(cfg.grad_clip is None or float(cfg.grad_clip) > 0, "train.grad_clip",
            f"must be null or > 0, got {cfg.grad_clip}")
    require(int(cfg.checkpoint_every) >= 1, "train.checkpoint_every", f"must be >= 1, got {cfg.checkpoint_every}")
    require(int(cfg.keep_checkpoints) >= 1, "train.keep_checkpoints", f"must be >= 1, got {cfg.keep_checkpoints}")
    return TrainSettings(
        steps=steps, batch_size=int(cfg.batch_size), lr=float(cfg.lr), lr_scheduler=str(cfg.lr_scheduler),
        lr_warmup_steps=int(cfg.lr_warmup_steps), weight_decay=float(cfg.weight_decay),
        ema_decay=None if cfg.ema_decay is None else float(cfg.ema_decay), hflip=bool(cfg.hflip),
        t_min=float(cfg.t_min), grad_clip=None if cfg.grad_clip is None else float(cfg.grad_clip),
        checkpoint_every=int(cfg.checkpoint_every), keep_checkpoints=int(cfg.keep_checkpoints),
        seed=int(cfg.seed), progress=bool(cfg.progress),
    )
