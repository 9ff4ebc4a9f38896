"""Related paper (diffusion Fisher), Table 2: the trace of the diffusion Fisher, learned (DF-TM)
against the autodiff trace of a learned score (VJP), on a 2-D chessboard where the exact trace is
known, and whether such a trace head could give diffsens' log-densities without Hutchinson probes.

The diffusion Fisher is ``F_t = -Hessian log rho_t``; for an empirical measure
``tr F = d / sigma^2 - alpha^2 / sigma^4 tr Cov(X | z)`` (the paper's Eq. 16), i.e. ``d / sigma^2 -
tr C`` with GtV's proxy-score covariance (``core.proxy_score``).  The paper's two estimates:

- VJP (Eq. 15): ``-tr J_z s_theta`` of a learned score network, by autodiff (exact for d = 2);
- DF-TM (Eq. 17): ``d / sigma^2 - alpha^2 / sigma^4 (d t_theta - |y_theta|^2)``, with ``t_theta``
  a second network trained to regress ``|x0|^2 / d`` on ``z`` (Algorithm 1; here each
  coordinate's ``x0_i^2``, whose mean is the same regression) and ``y_theta`` the score network's
  clean-sample prediction.

Both networks are diffsens' Fourier MLP with the same architecture (as the paper: App. B.1); the
score network predicts the clean sample, which a VE schedule's raw inputs (up to sigma_max = 50)
keep well conditioned.  Relative errors are means over points drawn from the diffused data at
each time.  Then along the learned score's PF-ODE paths, the CCoV log-density with the exact
divergence against the same integral with one Hutchinson probe per step and with the DF-TM
trace in place of ``-tr J s_theta``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli import progress
from diffsens_cli.builders import build_schedule, device_and_dtype, solver_settings
from diffsens_cli.core import dynamics
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.proxy_score import proxy_covariance
from diffsens_cli.core.schedule import Coefficients, Schedule
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.data.synthetic import build_dataset
from diffsens_cli.errors import listed, number, require, whole
from diffsens_cli.plots import synthetic as plots
from diffsens_cli.rundir import RunDir
from diffsens_cli.training.settings import TrainSettings, train_settings

STAGES = ("fisher_trace",)

# Table 2 of the related paper: relative error of the diffusion Fisher's trace per diffusion time t.
PAPER_TABLE2 = {"vjp": {"1.0": 0.0668, "0.8": 0.0579, "0.6": 0.1046, "0.4": 0.2013, "0.2": 0.5114, "0.0": 0.7095},
                "df_tm": {"1.0": 0.0341, "0.8": 0.0456, "0.6": 0.0413, "0.4": 0.0428, "0.2": 0.0533, "0.0": 0.0581}}

DEFINITIONS = {
    "relative_error": "mean over evaluation points of |estimate - exact tr F| over the mean of |exact tr F| "
                      "(tr F changes sign between the squares, so per-point ratios are unbounded); "
                      "median_pointwise: the median of |estimate - exact| / |exact|",
    "vjp": "-tr J_z s_theta of the learned score network, by autodiff (the paper's Eq. 15; exact in 2-D)",
    "df_tm": "d/sigma^2 - alpha^2/sigma^4 (d t_theta - |y_theta|^2): a learned second-moment head and the score "
             "network's clean-sample prediction (the paper's Eq. 17)",
    "log_density": "along the learned score's PF-ODE paths: the change of log-density (CCoV, left Riemann sum on "
                   "the path's grid) with each divergence estimate, against the same sum with the exact divergence "
                   "of the learned score: the mean, median and largest |error| (an error e multiplies a weight "
                   "nu_t / rho_t by exp(+-e))",
    "seconds_per_evaluation": "wall time of one divergence estimate for all paths at one step, measured side by side",
}


@dataclass
class Setup:
    """The checked settings of a run."""

    measure: GaussianMixture
    schedule: Schedule
    settings: SolverSettings
    device: torch.device
    dtype: torch.dtype
    times: list[float]  # diffusion times of the table
    num_eval: int
    num_paths: int
    train: TrainSettings
    seed: int


def checked(cfg: DictConfig) -> Setup:
    """Every value the task reads, checked."""
    measure = build_dataset(cfg.dataset)
    require(measure.dim == 2 and bool((measure.stds == 0).all()), "dataset.kind",
            "the exact trace is for an empirical set in the plane: use dataset=chessboard")
    require(cfg.model.kind == "mlp", "model.kind", f"both networks are Fourier MLPs: use model=mlp, got "
            f"{cfg.model.kind!r}")
    require(cfg.solver.method == "ode", "solver.method", "the log-densities follow PF-ODE paths: use method=ode")
    fc = cfg.fisher_trace
    times = listed(fc.times, "fisher_trace.times", number)
    require(all(0 <= t <= 1 for t in times), "fisher_trace.times", f"must be diffusion times in [0, 1], got {times}")
    device, dtype = device_and_dtype(cfg.solver)
    return Setup(measure, build_schedule(cfg.schedule), replace(solver_settings(cfg.solver), progress=False),
                 device, dtype, times, whole(fc.num_eval, "fisher_trace.num_eval", at_least=2),
                 whole(fc.num_paths, "fisher_trace.num_paths", at_least=2), train_settings(cfg.train, None),
                 int(cfg.seed))


def check(cfg: DictConfig) -> None:
    checked(cfg)


def exact_trace(measure: GaussianMixture, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``tr F = d / sigma^2 - tr C`` [B] of the diffused empirical measure (the paper's Eq. 16)."""
    cov, _ = proxy_covariance(measure, z, alpha, sigma)
    return z.shape[1] / sigma**2 - cov.diagonal(dim1=-2, dim2=-1).sum(-1)


def vjp_trace(model: ScoreModel, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``-tr J_z s`` [B] by d vector-Jacobian products (the paper's Eq. 15)."""
    d = z.shape[1]
    eye = torch.eye(d, dtype=z.dtype, device=z.device)[:, None, :].expand(d, len(z), d).contiguous()
    _, rows = model.score_and_vjp(z, t, eye)  # rows[i] = J^T e_i
    return -rows.diagonal(dim1=0, dim2=2).sum(-1)


def df_tm_trace(head: torch.nn.Module, model: ScoreModel, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 17 [B]: ``d / sigma^2 - alpha^2 / sigma^4 (d t_theta - |y_theta|^2)`` with
    ``d t_theta`` the sum of the head's per-coordinate second moments and ``y_theta = (z +
    sigma^2 s_theta) / alpha`` the score network's clean-sample prediction."""
    alpha, sigma = model.schedule.alpha(t), model.schedule.sigma(t)
    with torch.no_grad():
        second = head(z, model.schedule.model_time(t).expand(len(z))).sum(-1)
        y = (z + sigma**2 * model.score(z, t)) / alpha
    return z.shape[1] / sigma**2 - alpha**2 / sigma**4 * (second - (y * y).sum(-1))


def hutchinson_trace(model: ScoreModel, z: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``-e^T J_z s e`` [B] with one Gaussian probe per point (unbiased for ``-tr J s``)."""
    e = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    _, je = model.score_and_jvp(z, t, e[None])
    return -(e * je[0]).sum(-1)


def relative_errors(estimate: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """``relative_error`` and ``median_pointwise`` of DEFINITIONS."""
    diff = (estimate - exact).abs()
    return {"relative_error": float(diff.mean() / exact.abs().mean()),
            "median_pointwise": float((diff / exact.abs()).median())}


def train_networks(cfg: DictConfig, setup: Setup, directory: Path) -> tuple[ScoreModel, torch.nn.Module, dict]:
    """The score network (DSM, clean-sample prediction) and the second-moment head (the paper's
    Algorithm 1), the same architecture and training settings, in ``directory`` (resumable)."""
    from diffsens_cli.models.unet import build_network_model  # diffusers: only when training
    from diffsens_cli.training.dsm import second_moment_loss
    from diffsens_cli.training.trainer import Trainer

    measure = setup.measure.to("cpu", torch.float32)
    cpu = setup.device.type == "cpu"
    problem = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "schedule")}

    def trainer(model_cfg: DictConfig, train: TrainSettings, name: str, **loss) -> Trainer:
        """A resumable trainer whose checkpoints record all its weights depend on."""
        fingerprint = problem | {"model": OmegaConf.to_container(model_cfg, resolve=True), "network": name,
                                 "train": train.fingerprint()}
        return Trainer(build_network_model(model_cfg, (2,), setup.schedule), measure, (2,), train, directory / name,
                       cpu=cpu, fingerprint=fingerprint, **loss)

    score = trainer(cfg.model, setup.train, "score")
    head = trainer(OmegaConf.merge(cfg.model, {"seed": setup.seed + 1}), replace(setup.train, seed=setup.seed + 1),
                   "head", loss=second_moment_loss)
    losses = {}
    for name, trainer in (("score", score), ("head", head)):
        trainer.resume()
        trainer.train()
        losses[name] = trainer.recent_loss(100)
    return score.sampling_model(), head.sampling_model().net, losses


def log_density_changes(setup: Setup, model: ScoreModel, head: torch.nn.Module,
                        z0: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Along the learned score's PF-ODE paths from ``z0``: the change of log-density with each
    divergence estimate (the same left Riemann sum on the same points), and the seconds of one
    estimate for all paths."""
    settings = replace(setup.settings, record_every=1, density="ccov")
    res = Integrator(model, settings).run(z0)
    times = res.path_times.to(z0.device, z0.dtype)
    co = model.schedule.coefficients(times)
    generator = torch.Generator(z0.device).manual_seed(setup.seed)
    estimators = {"exact": lambda z, t: vjp_trace(model, z, t), "df_tm": lambda z, t: df_tm_trace(head, model, z, t),
                  "hutchinson_1": lambda z, t: hutchinson_trace(model, z, t, generator)}
    change = {k: torch.zeros(len(z0), dtype=z0.dtype, device=z0.device) for k in estimators}
    seconds = dict.fromkeys(estimators, 0.0)
    for k in range(len(times) - 1):
        z = res.path[k].to(z0.device, z0.dtype)
        at = Coefficients(co.alpha[k], co.sigma[k], co.a[k], co.c[k])
        for name, fisher_trace in estimators.items():
            start = time.perf_counter()
            value = fisher_trace(z, times[k]).detach()  # tr F = -tr J s
            seconds[name] += time.perf_counter() - start
            change[name] -= (times[k + 1] - times[k]) * dynamics.velocity_divergence(at, z.shape[1], -value)
    return change, {k: v / (len(times) - 1) for k, v in seconds.items()}


def _key(tau: float) -> str:
    return f"{tau:.1f}" if round(tau, 1) == tau else f"{tau:g}"


def compute(cfg: DictConfig, setup: Setup, directory: Path) -> dict[str, np.ndarray]:
    """Train both networks, then the three traces at each time's evaluation points, and the
    log-densities along PF-ODE paths: the arrays every number of the run comes from."""
    model, head, losses = train_networks(cfg, setup, directory)
    net_device = next(head.parameters()).device  # where the trainers put both networks
    measure = setup.measure.to("cpu", torch.float64)
    generator = torch.Generator().manual_seed(setup.seed)
    out: dict[str, np.ndarray] = {f"loss/{k}": np.array(v) for k, v in losses.items()}
    for tau in progress.bar(setup.times, desc="fisher_trace", enabled=bool(cfg.solver.progress)):
        t = torch.tensor(1 - tau, dtype=torch.float64)
        alpha, sigma = setup.schedule.alpha(t), setup.schedule.sigma(t)
        z = measure.sample_diffused(setup.num_eval, alpha, sigma, generator)
        learned_z, learned_t = z.float().to(net_device), t.float().to(net_device)
        key = _key(tau)
        out[f"{key}/z"] = z.numpy()
        out[f"{key}/exact"] = exact_trace(measure, z, alpha, sigma).numpy()
        out[f"{key}/vjp"] = vjp_trace(model, learned_z, learned_t).detach().double().cpu().numpy()
        out[f"{key}/df_tm"] = df_tm_trace(head, model, learned_z, learned_t).double().cpu().numpy()
    t0 = torch.tensor(0.0, dtype=torch.float64)
    z0 = MixtureScore(measure, setup.schedule).sample_base(setup.num_paths, (2,), t0, generator)
    changes, seconds = log_density_changes(setup, model, head, z0.float().to(net_device))
    out.update({f"log_density/{k}": v.cpu().numpy() for k, v in changes.items()})
    out.update({f"seconds/{k}": np.array(v) for k, v in seconds.items()})
    return out


def run(cfg: DictConfig, run: RunDir) -> None:
    setup = checked(cfg)
    depends = {"dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
               "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
               "model": OmegaConf.to_container(cfg.model, resolve=True), "train": setup.train.fingerprint(),
               "steps": setup.train.steps, "times": setup.times, "num_eval": setup.num_eval,
               "num_paths": setup.num_paths, "solver": {k: getattr(setup.settings, k) for k in
                                                        ("integrator", "num_steps", "step_size", "spacing", "t_min")},
               "seed": setup.seed}
    arrays = run.cache.arrays("fisher_trace", depends, lambda: compute(cfg, setup, Path(run.path) / "networks"))
    table = {}
    for tau in setup.times:
        key = _key(tau)
        exact = torch.from_numpy(arrays[f"{key}/exact"])
        table[key] = {name: {**relative_errors(torch.from_numpy(arrays[f"{key}/{name}"]), exact),
                             "paper": PAPER_TABLE2[name].get(key)} for name in ("vjp", "df_tm")}
    change = {k: arrays[f"log_density/{k}"] for k in ("exact", "df_tm", "hutchinson_1")}
    log_density = {}
    for name in ("df_tm", "hutchinson_1"):
        err = np.abs(change[name] - change["exact"])
        log_density[name] = {"mean_abs_error": float(err.mean()), "median_abs_error": float(np.median(err)),
                             "max_abs_error": float(err.max())}
    seconds = {k: float(arrays[f"seconds/{k}"]) for k in ("exact", "df_tm", "hutchinson_1")}
    labels = [f"t = {k}" for k in table]
    cells = [[f"{100 * row['vjp']['relative_error']:.2f}%", _paper(row["vjp"]["paper"]),
              f"{100 * row['df_tm']['relative_error']:.2f}%", _paper(row["df_tm"]["paper"])] for row in table.values()]
    figures = run.save_figure(plots.text_table(
        labels, ["VJP (ours)", "VJP (paper)", "DF-TM (ours)", "DF-TM (paper)"], cells,
        "Relative error of the diffusion Fisher's trace on the 2-D chessboard (related paper, Table 2)",
        f"Exact tr F from the {len(setup.measure.means)} chessboard points (Eq. 16); {setup.num_eval} points per t "
        "drawn from the diffused data; error: mean |estimate - exact| / mean |exact|.", verdict=False),
        "table2_fisher_trace")
    run.save_arrays("arrays", arrays)
    run.write_summary({"table": table, "log_density": log_density, "seconds_per_evaluation": seconds,
                       "final_loss": {k: float(arrays[f"loss/{k}"]) for k in ("score", "head")}},
                      definitions=DEFINITIONS, num_points=len(setup.measure.means), num_eval=setup.num_eval,
                      num_paths=setup.num_paths, figures=figures)


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
