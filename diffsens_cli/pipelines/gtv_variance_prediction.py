"""Predicting the variance of generation with the sensitivity machinery (issue 29, beyond GtV).

The naive sampler's score noise (covariance C/R per step, ``core.proxy_score``) and the
sensitivity equation (main paper Eq. 2) are moved by the same linearised flow, so to first order
the covariance of its end point from a fixed start is a sum over steps of the propagated C: one
reverse pass of the influence adjoint with C in place of the forcing (``predicted_covariance``).

1. **Naive sampler.** For fixed starts, the predicted end-point covariance against the empirical
   one over many naive repeats from each start, for several R: median relative error, Spearman
   over starts, and where first order breaks down (starts whose repeats end at different points).
2. **Learned models.** K Fourier-MLP score models trained on the same points with different seeds
   (initial weights and noise draws); the spread of their PF-ODE samples from the same starts
   against the prediction with one fitted scale, and against simple baselines with theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli import progress
from diffsens_cli.builders import build_schedule, device_and_dtype, naive_sampler_settings, point_sets
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.proxy_score import naive_sample, predicted_covariance, proxy_covariance
from diffsens_cli.core.schedule import Schedule
from diffsens_cli.core.stats import spearman_difference, spearman_interval
from diffsens_cli.errors import listed, number, one_of, require, whole
from diffsens_cli.plots import generalization as plots
from diffsens_cli.rundir import RunDir
from diffsens_cli.training.settings import TrainSettings, train_settings

STAGES = ("gtv_learned_samples",)

DEFINITIONS = {
    "predicted": "first-order end-point covariance of the naive sampler: sum over steps of "
                 "(h c)^2 Lambda^T C Lambda / R along the exact PF-ODE path (one adjoint pass, C in place of the "
                 "forcing)",
    "relative_error": "|tr Cov_empirical - tr Cov_predicted| / tr Cov_empirical per start (median over starts); "
                      "frobenius: the same with ||.||_F of the 2x2 difference",
    "within": "share of starts whose relative error is below gtv_variance_prediction.within",
    "spearman": "rank correlation over starts of a predictor with the empirical tr Cov, with a bootstrap interval "
                "over starts",
    "split": "starts whose repeats all end at the PF-ODE's point (one_basin) or not (switching): first order "
             "cannot describe a spread over several points",
    "unpropagated": "baseline: sum over steps of (h c)^2 tr C(z_k) / R, the same noise without the flow's Jacobian",
    "end_trace_c": "baseline: tr C at the PF-ODE end point",
    "end_distance": "baseline: distance from the PF-ODE end point to its nearest training point",
    "fitted_scale": "learned models: one scale per predictor, exp(median(log spread - log predictor)); "
                    "fitted_error: median |scale predictor - spread| / spread",
}


@dataclass
class Setup:
    """The checked settings of a run."""

    sets: dict[str, torch.Tensor]
    schedule: Schedule
    settings: SolverSettings
    device: torch.device
    dtype: torch.dtype
    num_starts: int
    repeats: int
    draws: list[int]
    within: float
    resamples: int
    learned_sets: list[str]
    num_models: int
    train: TrainSettings
    seed: int


def checked(cfg: DictConfig) -> Setup:
    """Every value the task reads, checked."""
    settings = replace(naive_sampler_settings(cfg.solver), density="closed_form")
    device, dtype = device_and_dtype(cfg.solver)
    vc = cfg.gtv_variance_prediction
    sets = point_sets(cfg.point_sets)
    draws = listed(vc.draws, "gtv_variance_prediction.draws", lambda v, k: whole(v, k, at_least=1))
    require(len(draws) >= 1 and draws == sorted(set(draws)), "gtv_variance_prediction.draws",
            f"must be increasing whole numbers, got {draws}")
    within = number(vc.within, "gtv_variance_prediction.within")
    require(0 < within < 1, "gtv_variance_prediction.within", f"must be in (0, 1), got {within}")
    learned = listed(vc.learned.sets, "gtv_variance_prediction.learned.sets",
                     lambda v, k: one_of(v, list(sets), k), min_len=0)  # []: no learned models
    require(cfg.model.kind == "mlp", "model.kind", f"the learned models are Fourier MLPs: use model=mlp, got "
            f"{cfg.model.kind!r}")
    return Setup(sets, build_schedule(cfg.schedule), settings, device, dtype,
                 whole(vc.num_starts, "gtv_variance_prediction.num_starts", at_least=3),
                 whole(vc.repeats, "gtv_variance_prediction.repeats", at_least=2), draws, within,
                 whole(vc.resamples, "gtv_variance_prediction.resamples", at_least=10), learned,
                 whole(vc.learned.models, "gtv_variance_prediction.learned.models", at_least=2),
                 train_settings(cfg.train, None), int(cfg.seed))


def check(cfg: DictConfig) -> None:
    checked(cfg)


def unpropagated(measure: GaussianMixture, schedule: Schedule, times: torch.Tensor, path: list[torch.Tensor],
                 draws: int) -> torch.Tensor:
    """The baseline without the flow: ``sum_k (h_k c_k)^2 tr C(z_k) / R`` [B] along ``path``
    (the points where the Euler steps evaluated the score)."""
    co = schedule.coefficients(times.to(path[0].dtype))
    total = torch.zeros(len(path[0]), dtype=path[0].dtype)
    for k, z in enumerate(path):
        c, _ = proxy_covariance(measure, z, co.alpha[k], co.sigma[k])
        total += ((times[k + 1] - times[k]) * co.c[k]) ** 2 * c.diagonal(dim1=-2, dim2=-1).sum(-1).cpu()
    return total / draws


def empirical_covariance(ends: torch.Tensor) -> torch.Tensor:
    """Per start, the sample covariance [S, d, d] of ends [S, M, d]."""
    dev = ends - ends.mean(1, keepdim=True)
    return dev.mT @ dev / (ends.shape[1] - 1)


def naive_metrics(predicted: torch.Tensor, empirical: torch.Tensor, switching: np.ndarray, baseline: np.ndarray,
                  within: float, resamples: int, seed: int) -> dict:
    """One (set, R) cell: errors of the prediction against the empirical covariances [S, d, d],
    split by whether a start's repeats switch point, and the rank correlations."""
    tr_pred = predicted.diagonal(dim1=-2, dim2=-1).sum(-1).cpu().numpy()
    tr_emp = empirical.diagonal(dim1=-2, dim2=-1).sum(-1).cpu().numpy()
    rel = np.abs(tr_emp - tr_pred) / tr_emp
    frob = (torch.linalg.matrix_norm(empirical - predicted) / torch.linalg.matrix_norm(empirical)).cpu().numpy()
    one = ~switching

    def median(x: np.ndarray) -> float | None:
        return float(np.median(x)) if len(x) else None

    return {"median_relative_error": float(np.median(rel)), "median_frobenius_error": float(np.median(frob)),
            "within": float((rel < within).mean()),
            "one_basin": {"starts": int(one.sum()), "median_relative_error": median(rel[one])},
            "switching": {"starts": int(switching.sum()), "median_relative_error": median(rel[switching])},
            "spearman": spearman_interval(tr_pred, tr_emp, resamples, seed),
            "spearman_unpropagated": spearman_interval(baseline, tr_emp, resamples, seed)}


def fitted(predictor: np.ndarray, spread: np.ndarray, resamples: int, seed: int) -> dict:
    """A predictor of the learned models' spread with one fitted scale: the scale, the median
    relative error after it, and the Spearman correlation (scale-free) with its interval."""
    ok = (predictor > 0) & (spread > 0)
    scale = float(np.exp(np.median(np.log(spread[ok]) - np.log(predictor[ok])))) if ok.any() else math.nan
    return {"fitted_scale": scale, "fitted_error": float(np.median(np.abs(scale * predictor - spread) / spread)),
            "spearman": spearman_interval(predictor, spread, resamples, seed)}


def learned_ends(cfg: DictConfig, setup: Setup, run: RunDir, name: str, points: torch.Tensor,
                 z0: torch.Tensor) -> torch.Tensor:
    """End points [K, S, d] of K Fourier-MLP score models trained on ``points`` with seeds
    0..K-1, each run as a PF-ODE from the starts ``z0`` on the solver's grid (cached)."""
    from diffsens_cli.models.unet import build_network_model  # diffusers: only when training
    from diffsens_cli.training.trainer import Trainer

    measure = GaussianMixture.empirical(points.cpu().float())
    sampling = replace(setup.settings, density="ccov", progress=False)
    ends = []
    for k in progress.bar(range(setup.num_models), desc=f"{name}: learned models", enabled=setup.settings.progress):
        model_cfg = OmegaConf.merge(cfg.model, {"seed": setup.seed + k})
        train = replace(setup.train, seed=setup.seed + k)
        # What the weights depend on (a checkpoint of other weights is refused on resume), then what the ends add.
        weights = {"points": points.tolist(), "model": OmegaConf.to_container(model_cfg, resolve=True),
                   "train": train.fingerprint(), "schedule": OmegaConf.to_container(cfg.schedule, resolve=True)}
        depends = weights | {"steps": train.steps, "starts": z0.tolist(), "solver": {
            k: getattr(sampling, k) for k in ("integrator", "num_steps", "step_size", "spacing", "t_min")}}

        def compute(model_cfg=model_cfg, train=train, k=k, weights=weights) -> dict[str, np.ndarray]:
            model = build_network_model(model_cfg, (2,), setup.schedule)
            trainer = Trainer(model, measure, (2,), train, Path(run.path) / "learned" / f"{name}_{k}",
                              cpu=setup.device.type == "cpu", fingerprint=weights)
            trainer.resume()
            trainer.train()
            net = trainer.sampling_model()
            x = Integrator(net, sampling).run(z0.float().to(trainer.device)).samples
            return {"ends": x.double().numpy(), "final_loss": np.array(trainer.recent_loss(100))}

        ends.append(torch.from_numpy(run.cache.arrays("gtv_learned_samples", depends, compute)["ends"]))
    return torch.stack(ends).to(z0.device, z0.dtype)


def run(cfg: DictConfig, run: RunDir) -> None:
    setup = checked(cfg)
    dev, dt = setup.device, setup.dtype
    t0 = torch.tensor(0.0, dtype=dt, device=dev)
    times = setup.settings.times(setup.schedule)
    t_end = times[-1].to(dt)
    metrics: dict[str, dict] = {}
    reasons: dict[str, str] = {}  # why a metric is NaN
    arrays: dict[str, np.ndarray] = {}
    for name in progress.bar(list(setup.sets), desc="gtv_variance_prediction", enabled=setup.settings.progress):
        points = setup.sets[name].to(dev, dt)
        measure = GaussianMixture.empirical(points)
        model = MixtureScore(measure, setup.schedule)
        z0 = model.sample_base(setup.num_starts, (2,), t0, torch.Generator(dev).manual_seed(setup.seed))
        quiet = replace(setup.settings, progress=False)
        res = Integrator(model, quiet, tape=True).run(z0)
        ode = res.samples.to(dev)
        per_unit = predicted_covariance(measure, model, res.tape, 1)  # R = 1; R divides it
        path = res.tape.z
        row: dict[str, dict] = {}
        s, m = setup.num_starts, setup.repeats
        for r in setup.draws:
            ends = naive_sample(measure, setup.schedule, times, z0.repeat_interleave(m, 0), r, seed=setup.seed)
            ends = ends.view(s, m, 2)
            switching = (torch.cdist(ends.reshape(-1, 2), points).argmin(1).view(s, m)
                         != torch.cdist(ode, points).argmin(1)[:, None]).any(1).cpu().numpy()
            empirical = empirical_covariance(ends)
            baseline = unpropagated(measure, setup.schedule, times, path, r).numpy()
            row[f"R{r}"] = naive_metrics(per_unit / r, empirical, switching, baseline, setup.within,
                                         setup.resamples, setup.seed)
            arrays[f"{name}/R{r}/empirical"] = empirical.cpu().numpy()
            arrays[f"{name}/R{r}/switching"] = switching
        arrays[f"{name}/predicted_per_draw"] = per_unit.cpu().numpy()
        arrays[f"{name}/z0"] = z0.cpu().numpy()
        if name in setup.learned_sets:
            learned = learned_ends(cfg, setup, run, name, points, z0)  # [K, S, 2]
            spread = learned.var(0).sum(-1).cpu().numpy()
            alpha_end, sigma_end = (f(t_end).to(dev) for f in (setup.schedule.alpha, setup.schedule.sigma))
            predictors = {
                "predicted": per_unit.diagonal(dim1=-2, dim2=-1).sum(-1).cpu().numpy(),
                "unpropagated": unpropagated(measure, setup.schedule, times, path, 1).numpy(),
                "end_trace_c": proxy_covariance(measure, ode, alpha_end, sigma_end)[0]
                .diagonal(dim1=-2, dim2=-1).sum(-1).cpu().numpy(),
                "end_distance": torch.cdist(ode, points).min(1).values.cpu().numpy()}
            row["learned"] = {k: fitted(v, spread, setup.resamples, setup.seed) for k, v in predictors.items()}
            row["learned"]["predicted_minus_baseline_spearman"] = {
                k: spearman_difference(predictors["predicted"], v, spread, setup.resamples, setup.seed)
                for k, v in predictors.items() if k != "predicted"}
            row["learned"]["models"] = setup.num_models
            for k, v in predictors.items():
                if np.ptp(v) == 0:
                    why = (f"{k} is {v[0]:.3g} at every start (tr C underflows where the posterior has collapsed): "
                           "a constant has no rank correlation or scale")
                    bounds = ("value", "ci_low", "ci_high")
                    for leaf in ("fitted_scale", "fitted_error", *(f"spearman.{c}" for c in bounds)):
                        reasons[f"metrics.{name}.learned.{k}.{leaf}"] = why
                    for leaf in bounds:
                        reasons[f"metrics.{name}.learned.predicted_minus_baseline_spearman.{k}.{leaf}"] = why
            arrays[f"{name}/learned/ends"] = learned.cpu().numpy()
            arrays[f"{name}/learned/spread"] = spread
            arrays.update({f"{name}/learned/{k}": v for k, v in predictors.items()})
        metrics[name] = row
    run.save_arrays("arrays", arrays)
    figures = run.save_figure(plots.variance_prediction(arrays, list(setup.sets), setup.draws),
                              "variance_prediction")
    if setup.learned_sets:
        figures += run.save_figure(plots.learned_spread(arrays, setup.learned_sets), "learned_spread")
    run.write_summary(metrics, reasons, definitions=DEFINITIONS, draws=setup.draws, num_starts=setup.num_starts,
                      repeats=setup.repeats, num_steps=setup.settings.num_steps, spacing=setup.settings.spacing,
                      schedule=str(cfg.schedule.kind), learned_sets=setup.learned_sets, figures=figures)
