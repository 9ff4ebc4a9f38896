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
from omegaconf import DictConfig

from diffsens_cli.core.integrate import Perturbation, SolverSettings
from diffsens_cli.core.steppers import STEPPERS
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import SCHEDULES, Schedule
from diffsens_cli.errors import ConfigError, flag, listed, number, one_of, plain, require, whole
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.models import VECTOR_KINDS
from diffsens_cli.training.settings import TrainSettings

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_schedule(cfg: DictConfig) -> Schedule:
    kind = one_of(cfg.kind, sorted(SCHEDULES), "schedule.kind")
    kwargs = {k: (whole if k == "num_train_timesteps" else number)(v, f"schedule.{k}")
              for k, v in plain(cfg).items() if k != "kind"}
    try:
        return SCHEDULES[kind](**kwargs)
    except TypeError as e:
        raise ConfigError("schedule", f"bad keys for kind {kind!r}: {e}") from None


def _points(value, dim: int, key: str) -> torch.Tensor:
    """A list of points, each a scalar (that value in every coordinate) or ``dim`` values."""
    value = plain(value)
    if not isinstance(value, list):
        value = [value]
    rows = []
    for i, v in enumerate(value):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append([number(v, f"{key}[{i}]")] * dim)
        else:
            require(isinstance(v, list) and len(v) == dim, f"{key}[{i}]",
                    f"needs a scalar or {dim} values (the dataset's dim), got {v!r}")
            rows.append(listed(v, f"{key}[{i}]", number))
    return torch.tensor(rows, dtype=torch.float64)


def _per_component(value, k: int, key: str, positive: bool = False) -> torch.Tensor:
    value = plain(value)
    vals = listed(value, key, number) if isinstance(value, list) else [number(value, key)] * k
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
    num_points = whole(cfg.num_points, "dataset.num_points")
    require(num_points >= 2, "dataset.num_points", f"must be >= 2, got {num_points}")
    s = torch.linspace(-1.0, 1.0, num_points, dtype=torch.float64)
    shape = one_of(cfg.shape, ["sine", "arc"], "dataset.shape")
    if shape == "sine":
        pts = torch.stack([1.5 * s, 0.6 * torch.sin(math.pi * s)], 1)
    else:
        pts = torch.stack([torch.cos(math.pi * (s + 1) / 2), torch.sin(math.pi * (s + 1) / 2)], 1)
    return GaussianMixture(pts, _per_component(cfg.std, pts.shape[0], "dataset.std"), torch.ones(pts.shape[0]))


def build_dataset(cfg: DictConfig) -> GaussianMixture:
    """The closed-form target measure rho of a synthetic data set."""
    kind = one_of(cfg.kind, ["gaussian_mixture", "curve"], "dataset.kind")
    dim = whole(cfg.dim, "dataset.dim")
    require(dim >= 1, "dataset.dim", f"must be >= 1, got {dim}")
    if kind == "curve":
        require(dim == 2, "dataset.dim", "a curve data set lives in 2 dimensions")
        return _curve(cfg)
    return _mixture(cfg, dim, "dataset")


def build_perturbation(cfg: DictConfig, target: GaussianMixture, seed: int = 0) -> Perturbation:
    """The perturbation measure nu (closed form), with its sign (add or remove)."""
    dim = target.dim
    kind = one_of(cfg.kind, ["gaussian", "gaussian_mixture", "empirical"], "perturbation.kind")
    sign = one_of(cfg.get("direction", "add"), ["add", "remove"], "perturbation.direction")
    if kind == "gaussian":
        mean = _points([plain(cfg.mean)], dim, "perturbation.mean")
        std = _per_component(cfg.std, 1, "perturbation.std", positive=True)
        measure = GaussianMixture(mean, std, torch.ones(1, dtype=torch.float64))
    elif kind == "gaussian_mixture":
        measure = _mixture(cfg, dim, "perturbation")
    else:
        measure = GaussianMixture.empirical(_empirical_points(cfg, target, seed))
    return Perturbation([measure], [1.0 if sign == "add" else -1.0])


def _empirical_points(cfg: DictConfig, target: GaussianMixture, seed: int) -> torch.Tensor:
    dim = target.dim
    if cfg.get("from_dataset") is not None:
        k = whole(cfg.from_dataset, "perturbation.from_dataset")
        require(k >= 1, "perturbation.from_dataset", f"must be >= 1 samples, got {k}")
        return target.sample(k, torch.Generator().manual_seed(seed + 1))
    if cfg.get("path"):
        return torch.from_numpy(read_points(cfg.path, dim))
    require(cfg.get("points") is not None, "perturbation.points",
            "an empirical perturbation needs points, path or from_dataset")
    return _points(cfg.points, dim, "perturbation.points")


def read_points(value: object, dim: int, key: str = "perturbation.path") -> np.ndarray:
    """Finite float64 points [K >= 1, dim] from a .npy file (no pickles) or a text file of
    whitespace-separated rows; a one-line ConfigError naming ``key`` and the file otherwise."""
    expected = f"expected a .npy or .txt array [K, {dim}] of finite numbers"
    require(isinstance(value, str), key, f"must be a file name, got {value!r}")
    path = Path(value).expanduser()
    require(path.is_file(), key, f"no such file: {path} ({expected})")
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                               f"{expected}") from None
    require(arr.dtype.kind in "biuf", key, f"{path} holds {arr.dtype} values; {expected}")
    require(arr.ndim in (1, 2) and arr.size > 0, key, f"{path} holds an array of shape {arr.shape}; {expected}")
    arr = arr.reshape(len(arr), -1).astype(np.float64)  # [K] is K points of dimension 1
    require(arr.shape[1] == dim, key, f"{path} holds points of dimension {arr.shape[1]}, "
            f"but the dataset has dim {dim}")
    require(bool(np.isfinite(arr).all()), key, f"{path} holds non-finite values (NaN or inf); {expected}")
    return arr


def build_model(cfg: DictConfig, target: GaussianMixture, schedule: Schedule) -> ScoreModel:
    """The exact score of the synthetic target, or a network on its ``dim`` coordinates."""
    kind = one_of(cfg.kind, VECTOR_KINDS, "model.kind")
    if kind == "closed_form":
        return MixtureScore(target, schedule)
    from diffsens_cli.models.unet import build_network_model  # diffusers: only for networks

    return build_network_model(cfg, (target.dim,), schedule)


def solver_settings(cfg: DictConfig, model: ScoreModel | None = None) -> SolverSettings:
    """Checked ``SolverSettings`` from the ``solver`` group."""
    method = one_of(cfg.method, ["ode", "sde"], "solver.method")
    integrator = one_of(cfg.integrator, list(STEPPERS), "solver.integrator")
    require(not (method == "sde" and integrator == "heun"), "solver.integrator",
            "the SDE is integrated with Euler-Maruyama: use integrator=euler with method=sde")
    step_size = number(cfg.step_size, "solver.step_size", null=True)
    num_steps = whole(cfg.num_steps, "solver.num_steps", null=True)
    if num_steps is None:
        require(step_size is not None and step_size > 0, "solver.step_size", f"must be > 0, got {cfg.step_size}")
    else:
        require(num_steps >= 1, "solver.num_steps", f"must be >= 1, got {num_steps}")
    t_min = number(cfg.t_min, "solver.t_min")
    require(0 < t_min < 1, "solver.t_min", f"must be in (0, 1), got {t_min}")
    density = one_of(cfg.density, ["ccov", "closed_form"], "solver.density")
    require(not (method == "sde" and density == "ccov"), "solver.density",
            "CCoV log-densities hold along ODE paths only; an SDE run needs density=closed_form")
    if model is not None:
        require(density != "closed_form" or model.has_log_density, "solver.density",
                f"closed_form needs a model with a closed-form density; {type(model).__name__} has none (use ccov)")
    divergence = one_of(cfg.divergence, ["exact", "hutchinson"], "solver.divergence")
    hutchinson_samples = whole(cfg.hutchinson_samples, "solver.hutchinson_samples")
    require(hutchinson_samples >= 1, "solver.hutchinson_samples", f"must be >= 1, got {hutchinson_samples}")
    clamp = plain(cfg.weight_clamp)
    if clamp is not None:
        need = f"must be null or [low, high] with 0 < low < high, got {clamp}"
        require(isinstance(clamp, list) and len(clamp) == 2, "solver.weight_clamp", need)
        low, high = listed(clamp, "solver.weight_clamp", number)
        require(0 < low < high, "solver.weight_clamp", need)
        clamp = (low, high)
    batch_size = whole(cfg.batch_size, "solver.batch_size", null=True)
    require(batch_size is None or batch_size >= 1, "solver.batch_size",
            f"must be null (as memory allows) or >= 1, got {batch_size}")
    tangent_batch_size = whole(cfg.tangent_batch_size, "solver.tangent_batch_size", null=True)
    require(tangent_batch_size is None or tangent_batch_size >= 1, "solver.tangent_batch_size",
            f"must be null (as memory allows) or >= 1, got {tangent_batch_size}")
    record_every = whole(cfg.get("record_every"), "solver.record_every", null=True)
    require(record_every is None or record_every >= 1, "solver.record_every",
            f"must be null or >= 1, got {record_every}")
    return SolverSettings(
        method=method, integrator=integrator, step_size=step_size, num_steps=num_steps,
        t_min=t_min, density=density, divergence=divergence, hutchinson_samples=hutchinson_samples,
        probe=one_of(cfg.probe, ["gaussian", "rademacher"], "solver.probe"),
        weight_clamp=clamp, batch_size=batch_size, tangent_batch_size=tangent_batch_size,
        seed=whole(cfg.seed, "solver.seed"), progress=flag(cfg.progress, "solver.progress"),
        record_every=record_every,
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
        self.perturbation = build_perturbation(cfg.perturbation, self.target, whole(cfg.seed, "seed"))
        self.model = build_model(cfg.model, self.target, self.schedule)
        self.solver = solver_settings(cfg.solver, self.model)

    def on_device(self) -> Components:
        """Move measures and model to the run's device and dtype."""
        self.target = self.target.to(self.device, self.dtype)
        self.perturbation = self.perturbation.to(self.device, self.dtype)
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
    batch_size = whole(cfg.batch_size, "train.batch_size")
    require(batch_size >= 1, "train.batch_size", f"must be >= 1, got {batch_size}")
    steps = whole(cfg.steps, "train.steps", null=True)
    if steps is not None:
        require(steps >= 1, "train.steps", f"must be >= 1, got {steps}")
    else:
        require(epoch_size is not None, "train.steps", "an endless data source (a closed-form target) needs steps")
        epochs = number(cfg.epochs, "train.epochs", null=True)
        require(epochs is not None and epochs > 0, "train.epochs", f"must be > 0, got {cfg.epochs}")
        steps = max(1, math.ceil(epochs * epoch_size / batch_size))
    lr = number(cfg.lr, "train.lr")
    require(lr > 0, "train.lr", f"must be > 0, got {lr}")
    lr_schedulers = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    lr_scheduler = one_of(cfg.lr_scheduler, lr_schedulers, "train.lr_scheduler")
    lr_warmup_steps = whole(cfg.lr_warmup_steps, "train.lr_warmup_steps")
    require(lr_warmup_steps >= 0, "train.lr_warmup_steps", f"must be >= 0, got {lr_warmup_steps}")
    weight_decay = number(cfg.weight_decay, "train.weight_decay")
    require(weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {weight_decay}")
    ema_decay = number(cfg.ema_decay, "train.ema_decay", null=True)
    require(ema_decay is None or 0 < ema_decay < 1, "train.ema_decay", f"must be null or in (0, 1), got {ema_decay}")
    eta_bar = number(cfg.eta_bar, "train.eta_bar")
    require(0 < eta_bar < 1, "train.eta_bar", f"must be in (0, 1), got {eta_bar}")
    t_min = number(cfg.t_min, "train.t_min")
    require(0 < t_min < 1, "train.t_min", f"must be in (0, 1), got {t_min}")
    grad_clip = number(cfg.grad_clip, "train.grad_clip", null=True)
    require(grad_clip is None or grad_clip > 0, "train.grad_clip", f"must be null or > 0, got {grad_clip}")
    checkpoint_every = whole(cfg.checkpoint_every, "train.checkpoint_every")
    require(checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {checkpoint_every}")
    keep_checkpoints = whole(cfg.keep_checkpoints, "train.keep_checkpoints")
    require(keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {keep_checkpoints}")
    return TrainSettings(
        steps=steps, batch_size=batch_size, lr=lr, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
        weight_decay=weight_decay, ema_decay=ema_decay, hflip=flag(cfg.hflip, "train.hflip"), t_min=t_min,
        grad_clip=grad_clip, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        seed=whole(cfg.seed, "train.seed"), progress=flag(cfg.progress, "train.progress"),
    )
