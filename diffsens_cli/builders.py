"""From config groups to engine objects: schedules, score models, solver settings,
device and dtype, and the ``Components`` of a synthetic experiment (its data and
perturbation come from ``data.synthetic``).

Every builder checks the values it reads and raises a ConfigError naming the key, so
a bad config fails before any work (the CLI runs these checks before Hydra starts a
run directory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import SCHEDULES, SPACINGS, Schedule
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.core.steppers import STEP_RULES
from diffsens_cli.data.synthetic import build_dataset, build_perturbation
from diffsens_cli.errors import ConfigError, flag, listed, number, one_of, plain, require, whole
from diffsens_cli.models import VECTOR_KINDS

DTYPES = {"float32": torch.float32, "float64": torch.float64}
NETWORK_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_STEP_SIZE = 1e-6  # of the solver: a million steps at most (a smaller step is a typo, not a setting)


def build_schedule(cfg: DictConfig) -> Schedule:
    kind = one_of(cfg.kind, sorted(SCHEDULES), "schedule.kind")
    kwargs = {k: (whole if k == "num_train_timesteps" else number)(v, f"schedule.{k}")
              for k, v in plain(cfg).items() if k != "kind"}
    try:
        return SCHEDULES[kind](**kwargs)
    except TypeError as e:
        raise ConfigError("schedule", f"bad keys for kind {kind!r}: {e}") from None


def build_model(cfg: DictConfig, target: GaussianMixture, schedule: Schedule) -> ScoreModel:
    """The exact score of the synthetic target, or a network on its ``dim`` coordinates."""
    kind = one_of(cfg.kind, VECTOR_KINDS, "model.kind")
    if kind == "closed_form":
        return MixtureScore(target, schedule)
    from diffsens_cli.models.unet import build_network_model  # diffusers: only for networks

    return build_network_model(cfg, (target.dim,), schedule)


def solver_settings(cfg: DictConfig, model: ScoreModel | None = None) -> SolverSettings:
    """Checked ``SolverSettings`` from the ``solver`` group."""
    method = one_of(cfg.method, sorted({m for m, _ in STEP_RULES}), "solver.method")
    integrator = one_of(cfg.integrator, sorted({i for _, i in STEP_RULES}), "solver.integrator")
    usable = sorted(i for m, i in STEP_RULES if m == method)
    require((method, integrator) in STEP_RULES, "solver.integrator",
            f"{integrator!r} has no step rule for method={method}: use one of {', '.join(usable)}")
    step_size = number(cfg.step_size, "solver.step_size", null=True)
    num_steps = whole(cfg.num_steps, "solver.num_steps", null=True)
    if num_steps is None or step_size is not None:  # checked even where num_steps overrides it
        require(step_size is not None and step_size > 0, "solver.step_size", f"must be > 0, got {cfg.step_size}")
        require(step_size >= MIN_STEP_SIZE, "solver.step_size",
                f"must be >= {MIN_STEP_SIZE:g} (at most {1 / MIN_STEP_SIZE:,.0f} steps), got {cfg.step_size}")
    if num_steps is not None:
        require(1 <= num_steps <= 1 / MIN_STEP_SIZE, "solver.num_steps",
                f"must be in 1 .. {1 / MIN_STEP_SIZE:.0f}, got {num_steps}")
    t_min = number(cfg.t_min, "solver.t_min")
    require(0 < t_min < 1, "solver.t_min", f"must be in (0, 1), got {t_min}")
    density = one_of(cfg.density, ["ccov", "closed_form"], "solver.density")
    require(not (method == "sde" and density == "ccov"), "solver.density",
            "CCoV log-densities hold along ODE paths only; an SDE run needs density=closed_form")
    if model is not None:
        require(density != "closed_form" or model.has_log_density, "solver.density",
                f"closed_form needs a model with a closed-form density; {type(model).__name__} has none (use ccov)")
    divergence = one_of(cfg.divergence, ["exact", "hutchinson"], "solver.divergence")
    hutchinson_samples = whole(cfg.hutchinson_samples, "solver.hutchinson_samples", at_least=1)
    clamp = plain(cfg.weight_clamp)
    if clamp is not None:
        need = f"must be null or [low, high] with 0 < low < high, got {clamp}"
        require(isinstance(clamp, list) and len(clamp) == 2, "solver.weight_clamp", need)
        low, high = listed(clamp, "solver.weight_clamp", number)
        require(0 < low < high, "solver.weight_clamp", need)
        clamp = (low, high)
    batch_size = whole(cfg.batch_size, "solver.batch_size", null=True, at_least=1)
    tangent_batch_size = whole(cfg.tangent_batch_size, "solver.tangent_batch_size", null=True, at_least=1)
    record_every = whole(cfg.get("record_every"), "solver.record_every", null=True, at_least=1)
    return SolverSettings(
        method=method, integrator=integrator, step_size=step_size, num_steps=num_steps,
        spacing=one_of(cfg.spacing, SPACINGS, "solver.spacing"),
        t_min=t_min, density=density, divergence=divergence, hutchinson_samples=hutchinson_samples,
        probe=one_of(cfg.probe, ["gaussian", "rademacher"], "solver.probe"),
        weight_clamp=clamp, batch_size=batch_size, tangent_batch_size=tangent_batch_size,
        seed=whole(cfg.seed, "solver.seed"), progress=flag(cfg.progress, "solver.progress"),
        record_every=record_every,
        sde_sensitivity=one_of(cfg.sde_sensitivity, ["drift", "velocity"], "solver.sde_sensitivity"),
    )


def naive_sampler_settings(cfg: DictConfig) -> SolverSettings:
    """The ``solver`` group's settings for GtV's naive sampler, which is forward Euler on the
    PF-ODE (its App. D); refused in one line for any other rule."""
    why = "the naive sampler is GtV's forward Euler on the PF-ODE (App. D): use method=ode, integrator=euler"
    require(cfg.method == "ode", "solver.method", f"{why}, got method={cfg.method}")
    require(cfg.integrator == "euler", "solver.integrator", f"{why}, got integrator={cfg.integrator}")
    return solver_settings(cfg)


@dataclass(frozen=True)
class NetworkPrecision:
    """``solver.network_dtype`` and its check: the network evaluated in ``dtype``, offered
    once psi of ``check_samples`` model samples is within ``tolerance`` (median relative
    distance) of psi with the network in ``solver.dtype``."""

    dtype: torch.dtype
    check_samples: int
    tolerance: float


def network_precision(cfg: DictConfig) -> NetworkPrecision | None:
    """The ``solver`` group's half-precision setting, checked; None for ``network_dtype: null``."""
    name = cfg.get("network_dtype")
    if name is None:
        return None
    require(name in NETWORK_DTYPES, "solver.network_dtype", f"{name!r} is not one of null, {', '.join(NETWORK_DTYPES)}")
    dtype = NETWORK_DTYPES[name]
    check = cfg.network_dtype_check
    tolerance = number(check.tolerance, "solver.network_dtype_check.tolerance")
    require(tolerance > 0, "solver.network_dtype_check.tolerance", f"must be > 0, got {tolerance}")
    return NetworkPrecision(dtype, whole(check.samples, "solver.network_dtype_check.samples", at_least=1), tolerance)


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
            f"{name!r} asked for, but torch {torch.__version__} sees no CUDA device "
            "(see docs/cluster.md, 'Installing on a GPU machine')")
    return device, dtype


def fits_dtype(measure: GaussianMixture, dtype: torch.dtype, key: str) -> None:
    """A ConfigError naming ``key`` when the means of ``measure``, their squared norms or
    its stds are not finite in ``dtype`` (e.g. a mean of 1e300: its square overflows even
    float64), where every density and score of it would be NaN or infinite."""
    name, most = str(dtype).removeprefix("torch."), torch.finfo(dtype).max
    for what, values, scale in (("means", measure.means, measure.means), ("stds", measure.stds, measure.stds),
                                ("means' squared norms", measure.sq_norms, measure.means)):
        big = scale.abs().max().item() if scale.numel() else 0.0
        require(bool(torch.isfinite(values.to(dtype)).all()), key,
                f"its {what} overflow solver.dtype={name} (largest {most:.3g}): its values reach {big:.3g}; "
                "use a scale near the data's")


class Components:
    """Everything a pipeline builds from the config, checked: target rho, nu, the score
    model, the schedule, solver settings, device and dtype."""

    def __init__(self, cfg: DictConfig):
        self.device, self.dtype = device_and_dtype(cfg.solver)
        self.schedule = build_schedule(cfg.schedule)
        self.target = build_dataset(cfg.dataset)
        self.perturbation = build_perturbation(cfg.perturbation, self.target, whole(cfg.seed, "seed"))
        fits_dtype(self.target, self.dtype, "dataset")
        for measure in self.perturbation.measures:
            fits_dtype(measure, self.dtype, "perturbation")
        self.model = build_model(cfg.model, self.target, self.schedule)
        self.solver = solver_settings(cfg.solver, self.model)
        require(network_precision(cfg.solver) is None, "solver.network_dtype",
                "half-precision network evaluations are for image experiments; synthetic ones run in solver.dtype "
                "(set it to null)")

    def on_device(self) -> Components:
        """Move measures and model to the run's device and dtype."""
        self.target = self.target.to(self.device, self.dtype)
        self.perturbation = self.perturbation.to(self.device, self.dtype)
        if isinstance(self.model, MixtureScore):
            self.model = MixtureScore(self.target, self.schedule)
        else:
            self.model.net.to(device=self.device, dtype=self.dtype)
        return self


def point_sets(node: object, key: str = "point_sets") -> dict[str, torch.Tensor]:
    """Named sets of points in the plane (configs/point_sets/), each [M, 2] float64 with M >= 2:
    the empirical training sets of the GtV experiments."""
    require(isinstance(node, DictConfig) and len(node) >= 1, key,
            f"must be a non-empty mapping of name: [[x, y], ...], got {node!r}")
    sets = {}
    for name, points in node.items():
        def point(value: object, k: str) -> list[float]:
            xy = listed(value, k, number)
            require(len(xy) == 2, k, f"needs 2 coordinates (the figures draw the plane), got {xy}")
            return xy

        rows = listed(points, f"{key}.{name}", point)
        require(len(rows) >= 2, f"{key}.{name}", f"needs at least 2 points (a boundary between them), got {len(rows)}")
        sets[str(name)] = torch.tensor(rows, dtype=torch.float64)
    return sets
