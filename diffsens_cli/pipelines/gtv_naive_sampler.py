"""Related paper "Generalization through variance" (GtV), Fig. 2 and Prop. 4.1: the naive sampler
against the PF-ODE and a kernel density estimate.

For each six-point set: the naive sampler (forward Euler on the PF-ODE of the empirical measure,
the score at each step the mean of R proxy scores of fresh posterior draws; ``core.proxy_score``),
the exact-score PF-ODE on the same grid from the same starts, the effective SDE of Prop. 3.1 (the
same steps with Gaussian noise of the naive score's covariance C/R), and a Gaussian kernel density
estimate around the training points whose bandwidth is matched to the naive sampler's spread (the
root-mean-square distance to the nearest training point, by bisection).  Then where the extra
mass lands (naive against KDE, bootstrap intervals), and how the naive sampler's departure from
the PF-ODE scales with R and with the number of steps: in discrete time the per-step score noise
C/R enters multiplied by the step, so the effective diffusion is (step/R) C, and the paper's 1/R
holds at a fixed grid while the effect fades as the steps shrink.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli import progress
from diffsens_cli.builders import build_schedule, device_and_dtype, naive_sampler_settings, point_sets
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.proxy_score import naive_sample
from diffsens_cli.core.schedule import Schedule
from diffsens_cli.core.stats import bootstrap_difference, bootstrap_interval, percentile_interval
from diffsens_cli.errors import listed, require, whole
from diffsens_cli.plots import generalization as plots
from diffsens_cli.rundir import RunDir

BOUNDARY = 0.5  # d1/d2 above this: a sample nearer the boundary between two points than either point

DEFINITIONS = {
    "rms_nearest": "root-mean-square distance of a sample to its nearest training point (the spread)",
    "nearest_ratio": "mean over samples of d1/d2, the distances to the nearest and second-nearest training points "
                     "(0 at a point, 1 on the boundary between two)",
    "boundary_share": f"share of samples with d1/d2 > {BOUNDARY}",
    "alignment": "mean cosine between a sample's offset from its nearest training point and the direction from that "
                 "point to the sample's second-nearest one (isotropic noise about the points gives the KDE's value)",
    "kde_bandwidth": "the Gaussian KDE's bandwidth, found by bisection so that its rms_nearest equals the naive "
                     "sampler's (as many samples, fixed draws)",
    "naive_minus_kde": "naive sampler's statistic minus that of a KDE matched to its spread, with a bootstrap "
                       "interval (independent samples); pf_ode_minus_kde: the same for the Euler PF-ODE on that grid",
    "switched": "share of paths whose naive end point is nearest another training point than the PF-ODE's from the "
                "same start on the same grid",
    "deviation": "mean |x_naive - x_ode|^2 over the paths that did not switch (same start, same grid)",
    "slope": "least-squares slope of log deviation against log R (draws) or log steps, with a bootstrap interval "
             "over paths; first-order theory: -1 in R at a fixed grid",
    "pf_ode_converged": "the PF-ODE to convergence from the same starts (Heun, reference_steps on the same kind of "
                        "grid); pf_ode: forward Euler on the naive sampler's grid",
    "pf_ode_nearest_over_sigma_min": "median distance of a converged PF-ODE end point to its nearest training "
                                     "point, over sigma_min (the exact flow ends at the points blurred by "
                                     "N(0, sigma_min^2 I): about 1.18)",
    "pf_ode_denoised_max": "largest distance from the posterior mean E[X | z_end] of a converged PF-ODE end point "
                           "to its nearest training point (0: the PF-ODE reproduces the training points)",
}


@dataclass
class Setup:
    """The checked settings of a run."""

    sets: dict[str, torch.Tensor]
    schedule: Schedule
    settings: SolverSettings
    device: torch.device
    dtype: torch.dtype
    num_samples: int
    draws: int
    sweep_draws: list[int]
    sweep_steps: list[int]
    reference_steps: int
    resamples: int
    seed: int


def checked(cfg: DictConfig) -> Setup:
    """Every value the task reads, checked."""
    settings = naive_sampler_settings(cfg.solver)
    require(settings.num_steps is not None, "solver.num_steps", "set the number of steps (the sweeps vary it)")
    device, dtype = device_and_dtype(cfg.solver)
    nc = cfg.gtv_naive_sampler

    def counts(key: str) -> list[int]:
        values = listed(nc[key], f"gtv_naive_sampler.{key}", lambda v, k: whole(v, k, at_least=1))
        require(len(values) >= 2 and values == sorted(set(values)), f"gtv_naive_sampler.{key}",
                f"must be at least two increasing whole numbers (a slope is fitted), got {values}")
        return values

    return Setup(point_sets(cfg.point_sets), build_schedule(cfg.schedule), settings, device, dtype,
                 whole(nc.num_samples, "gtv_naive_sampler.num_samples", at_least=2),
                 whole(nc.draws, "gtv_naive_sampler.draws", at_least=1), counts("sweep_draws"), counts("sweep_steps"),
                 whole(nc.reference_steps, "gtv_naive_sampler.reference_steps", at_least=1),
                 whole(nc.resamples, "gtv_naive_sampler.resamples", at_least=10), int(cfg.seed))


def check(cfg: DictConfig) -> None:
    checked(cfg)


def placement(samples: torch.Tensor, points: torch.Tensor) -> dict[str, np.ndarray]:
    """Per sample [n]: the distances to the nearest and second-nearest training point, their
    ratio, the index of the nearest, and the cosine between the offset from the nearest point and
    the direction from it to the second-nearest."""
    dist = torch.cdist(samples, points)
    (d1, d2), (a, b) = (x.unbind(1) for x in dist.topk(2, dim=1, largest=False))
    offset, direction = samples - points[a], points[b] - points[a]
    cos = (offset * direction).sum(1) / (offset.norm(dim=1) * direction.norm(dim=1)).clamp_min(1e-300)
    return {"d1": d1.cpu().numpy(), "d2": d2.cpu().numpy(), "ratio": (d1 / d2).cpu().numpy(),
            "nearest": a.cpu().numpy(), "cos": cos.cpu().numpy()}


def rms_nearest(samples: torch.Tensor, points: torch.Tensor) -> float:
    return float(torch.cdist(samples, points).min(1).values.square().mean().sqrt())


def matched_kde(points: torch.Tensor, target_rms: float, n: int,
                generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """``n`` samples of the Gaussian KDE around ``points`` whose spread (rms distance to the
    nearest point) is ``target_rms``, and its bandwidth: bisection on the bandwidth with the
    component draws and the normals fixed."""
    idx = torch.randint(len(points), (n,), generator=generator)
    eps = torch.randn(n, points.shape[1], generator=generator, dtype=points.dtype)
    centres = points[idx]
    lo, hi = 0.0, max(target_rms, 1e-12)
    while rms_nearest(centres + hi * eps, points) < target_rms:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rms_nearest(centres + mid * eps, points) < target_rms else (lo, mid)
    h = (lo + hi) / 2
    return centres + h * eps, h


def summary_of(where: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, dict[str, float] | float]:
    """A sample set's placement statistics with bootstrap intervals of their means."""
    return {"rms_nearest": float(np.sqrt(np.mean(where["d1"] ** 2))),
            "nearest_ratio": bootstrap_interval(where["ratio"], np.mean, resamples, seed),
            "boundary_share": bootstrap_interval((where["ratio"] > BOUNDARY).astype(float), np.mean, resamples, seed),
            "alignment": bootstrap_interval(where["cos"], np.mean, resamples, seed)}


def departure(naive: torch.Tensor, ode: torch.Tensor, points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per path: whether the naive end point is nearest another training point than the
    PF-ODE's, and ``|x_naive - x_ode|^2``."""
    switched = torch.cdist(naive, points).argmin(1) != torch.cdist(ode, points).argmin(1)
    return switched.cpu().numpy(), (naive - ode).square().sum(1).cpu().numpy()


def fitted_slope(x: list[int], dev: np.ndarray, resamples: int, seed: int,
                 statistic: Callable[..., np.ndarray] = np.nanmean) -> dict[str, float]:
    """Slope of log(statistic of the deviations) against log x over the rows of ``dev``
    [len(x), paths] (NaN: switched paths, left out), with a bootstrap interval resampling the
    paths (the same paths for every x: their starts are shared)."""
    logx = np.log(np.asarray(x, dtype=float))

    def slope(cols: np.ndarray) -> float:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a row of switched paths only: NaN, left out
            values = statistic(dev[:, cols], axis=1)
        ok = np.isfinite(values) & (values > 0)
        return float(np.polyfit(logx[ok], np.log(values[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")

    rng = np.random.default_rng(seed)
    paths = dev.shape[1]
    low, high = percentile_interval(np.array([slope(rng.integers(0, paths, paths)) for _ in range(resamples)]))
    return {"value": slope(np.arange(paths)), "ci_low": low, "ci_high": high}


def against_kde(samples: torch.Tensor, points: torch.Tensor, resamples: int,
                seed: int) -> tuple[dict, dict[str, np.ndarray], torch.Tensor, float]:
    """Where ``samples`` put their mass against a KDE matched to their spread: the differences
    of the placement statistics (bootstrap intervals), both placements, the KDE's samples and
    its bandwidth."""
    kde, bandwidth = matched_kde(points.cpu(), rms_nearest(samples, points), len(samples),
                                 torch.Generator().manual_seed(seed))
    kde = kde.to(points.device)
    ours, theirs = placement(samples, points), placement(kde, points)
    diffs = {stat: bootstrap_difference(a, b, np.mean, resamples, seed) for stat, (a, b) in {
        "nearest_ratio": (ours["ratio"], theirs["ratio"]),
        "boundary_share": ((ours["ratio"] > BOUNDARY) * 1.0, (theirs["ratio"] > BOUNDARY) * 1.0),
        "alignment": (ours["cos"], theirs["cos"])}.items()}
    return diffs, {"naive": ours, "kde": theirs}, kde, bandwidth


def _by_statistic(rows: list[dict[str, dict]]) -> dict[str, list[dict]]:
    """Per-sweep-point dicts of statistics turned into one list per statistic."""
    return {stat: [r[stat] for r in rows] for stat in rows[0]}


def run(cfg: DictConfig, run: RunDir) -> None:
    setup = checked(cfg)
    dev, dt = setup.device, setup.dtype
    t0 = torch.tensor(0.0, dtype=dt, device=dev)
    quiet = replace(setup.settings, progress=False)
    sigma_min = float(setup.schedule.sigma(torch.tensor(quiet.grid()[1], dtype=torch.float64)))
    metrics: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in progress.bar(list(setup.sets), desc="gtv_naive_sampler", enabled=setup.settings.progress):
        points = setup.sets[name].to(dev, dt)
        measure = GaussianMixture.empirical(points)
        model = MixtureScore(measure, setup.schedule)
        z0 = model.sample_base(setup.num_samples, (2,), t0, torch.Generator(dev).manual_seed(setup.seed))

        runs: dict[tuple[int, int | None, str], torch.Tensor] = {}

        def paths(steps: int, draws: int | None, noise: str = "posterior") -> torch.Tensor:
            """End points from ``z0`` with ``steps`` Euler steps: the naive sampler's with ``draws``
            (None: the exact-score PF-ODE's); each run once, the figure's and the sweeps' alike."""
            if (steps, draws, noise) not in runs:
                grid = replace(quiet, num_steps=steps)
                runs[steps, draws, noise] = Integrator(model, grid).run(z0).samples.to(dev) if draws is None else \
                    naive_sample(measure, setup.schedule, grid.times(setup.schedule), z0, draws, seed=setup.seed,
                                 noise=noise)
            return runs[steps, draws, noise]

        steps = quiet.num_steps
        ode = paths(steps, None)
        reference = Integrator(model, replace(quiet, integrator="heun", num_steps=setup.reference_steps)).run(z0)
        reference = reference.samples.to(dev)
        naive = paths(steps, setup.draws)
        effective = paths(steps, setup.draws, "gaussian")
        diffs, where, kde, bandwidth = against_kde(naive, points, setup.resamples, setup.seed)
        where |= {k: placement(x, points) for k, x in
                  {"effective_sde": effective, "pf_ode": ode, "pf_ode_converged": reference}.items()}
        row = {k: summary_of(w, setup.resamples, setup.seed) for k, w in where.items()}
        row["kde_bandwidth"] = bandwidth
        row["naive_minus_kde"] = diffs
        t_end = torch.tensor(quiet.grid()[1], dtype=dt, device=dev)
        denoised = measure.posterior_moments(reference, setup.schedule.alpha(t_end), setup.schedule.sigma(t_end))[0]
        row["pf_ode_nearest_over_sigma_min"] = float(np.median(where["pf_ode_converged"]["d1"]) / sigma_min)
        row["pf_ode_denoised_max"] = float(torch.cdist(denoised, points).min(1).values.max())
        row["pf_ode_share_per_point"] = np.bincount(where["pf_ode_converged"]["nearest"],
                                                    minlength=len(points)).tolist()

        sweeps = {"draws": [(steps, r) for r in setup.sweep_draws],
                  "steps": [(n, setup.draws) for n in setup.sweep_steps]}
        for label, cells in sweeps.items():
            ends = [paths(n, r) for n, r in cells]
            odes = [paths(n, None) for n, _ in cells]
            switched, squared = map(np.stack, zip(*(departure(e, o, points) for e, o in zip(ends, odes, strict=True)),
                                                  strict=True))
            deviation = np.where(switched, np.nan, squared)  # the paths that end at the same point
            x = setup.sweep_draws if label == "draws" else setup.sweep_steps
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a row of switched paths only: NaN
                row[f"by_{label}"] = {
                    "x": x, "switched": switched.mean(1).tolist(),
                    "deviation": np.nanmean(deviation, axis=1).tolist(),
                    "deviation_median": np.nanmedian(deviation, axis=1).tolist(),
                    "slope": fitted_slope(x, deviation, setup.resamples, setup.seed),
                    "slope_median": fitted_slope(x, deviation, setup.resamples, setup.seed, np.nanmedian),
                    "local_slopes_median": (np.diff(np.log(np.nanmedian(deviation, axis=1)))
                                            / np.diff(np.log(np.asarray(x, dtype=float)))).tolist(),
                    "naive_minus_kde": _by_statistic([against_kde(e, points, setup.resamples, setup.seed)[0]
                                                      for e in ends]),
                    "pf_ode_minus_kde": _by_statistic([against_kde(o, points, setup.resamples, setup.seed)[0]
                                                       for o in odes])}
            arrays[f"{name}/switched_by_{label}"] = switched
            arrays[f"{name}/squared_deviation_by_{label}"] = squared
        metrics[name] = row
        arrays.update({f"{name}/points": points.cpu().numpy(), f"{name}/z0": z0.cpu().numpy(),
                       f"{name}/pf_ode": ode.cpu().numpy(), f"{name}/pf_ode_converged": reference.cpu().numpy(),
                       f"{name}/naive": naive.cpu().numpy(),
                       f"{name}/effective_sde": effective.cpu().numpy(), f"{name}/kde": kde.cpu().numpy()})
    run.save_arrays("arrays", arrays)
    figures = run.save_figure(plots.naive_against_kde(arrays, list(setup.sets), setup.draws, quiet.num_steps),
                              "fig2_naive_vs_kde")
    figures += run.save_figure(plots.naive_scaling(metrics, setup.draws, quiet.num_steps), "naive_scaling")
    run.write_summary(metrics, definitions=DEFINITIONS, draws=setup.draws, num_steps=quiet.num_steps,
                      spacing=quiet.spacing, sigma_min=sigma_min, num_samples=setup.num_samples,
                      schedule=str(cfg.schedule.kind), device=str(dev), dtype=str(dt), figures=figures)
