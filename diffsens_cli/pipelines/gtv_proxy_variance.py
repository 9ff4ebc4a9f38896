"""Related paper "Generalization through variance" (GtV), Fig. 1: where the proxy score is noise.

For each six-point set (configs/point_sets/gtv_six.yaml) and noise level ``sigma / alpha``, the
share ``tr C / (tr C + |s|^2)`` of the proxy score's second moment that is variance
(``core.proxy_score``) over a grid of the plane, and the claims of the paper's figure as numbers:
the share is high between neighbouring points, low beside each point and far from all of them
at small noise, and the region where it is high widens as the noise grows.

The map depends on a schedule only through ``sigma / alpha`` (on the plane scaled by ``1 / alpha``),
so the levels are given as that ratio: GtV's EDM time ``t`` itself, and for a VP schedule the time
where ``sigma_t / alpha_t`` reaches it, with or without the 1/2 of ``alpha = exp(-1/2 int beta)``.
The closed form ``C = alpha^2 / sigma^4 Cov(X | z)`` (Eq. 34) is checked against the Monte-Carlo
covariance of the proxy scores of many posterior draws at the midpoints between neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli import progress
from diffsens_cli.builders import point_sets
from diffsens_cli.core import keyed_random
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.proxy_score import proxy_covariance, proxy_score, variance_share
from diffsens_cli.errors import flag, listed, number, require, whole
from diffsens_cli.plots import generalization as plots
from diffsens_cli.rundir import RunDir

F64 = torch.float64
RING_DIRECTIONS = 16  # points on the ring around each training point
MC_BATCHES = 20  # batches of the Monte-Carlo draws, for their standard error

DEFINITIONS = {
    "share": "tr C / (tr C + |s|^2): the share of E[|s~|^2 | z] that is the proxy score's variance (0: all signal, "
             "1: all noise); C = Cov[s~ | z] (GtV Eq. 34), s the score",
    "between": "mean share at the midpoints between each point and its nearest neighbour",
    "beside": "mean share on a ring around each point at gtv_proxy_variance.ring times its nearest-neighbour "
              "distance (at a point itself the share is its own posterior weight, near 1: noise and signal both "
              "vanish there, a spike of vanishing width)",
    "far": "mean share over the grid points farther than gtv_proxy_variance.far_distance from every point",
    "boundary_area": "share of the grid where the share exceeds 1/2",
    "mc_relative_error": "|tr of the Monte-Carlo covariance of the proxy scores of mc_draws posterior draws - tr C| "
                         "/ tr C at the midpoints between neighbours (max over them); mc_error_in_se: the same error "
                         "in Monte-Carlo standard errors (batch means)",
}


@dataclass
class Setup:
    """The checked settings of a run."""

    sets: dict[str, torch.Tensor]
    levels: list[float]
    grid_size: int
    extent: float
    ring: float
    far_distance: float
    mc_draws: int
    seed: int
    show_progress: bool


def checked(cfg: DictConfig) -> Setup:
    """Every value the task reads, checked."""
    gc = cfg.gtv_proxy_variance
    levels = listed(gc.noise_levels, "gtv_proxy_variance.noise_levels", number)
    require(len(levels) >= 1 and all(v > 0 for v in levels) and levels == sorted(set(levels)),
            "gtv_proxy_variance.noise_levels", f"must be increasing noise levels sigma/alpha > 0, got {levels}")
    extent = number(gc.extent, "gtv_proxy_variance.extent")
    require(extent > 0, "gtv_proxy_variance.extent", f"must be > 0, got {extent}")
    ring = number(gc.ring, "gtv_proxy_variance.ring")
    require(0 < ring < 0.5, "gtv_proxy_variance.ring", f"must be in (0, 0.5) (a fraction of the nearest-neighbour "
            f"distance), got {ring}")
    far = number(gc.far_distance, "gtv_proxy_variance.far_distance")
    require(far > 0, "gtv_proxy_variance.far_distance", f"must be > 0, got {far}")
    return Setup(point_sets(cfg.point_sets), levels, whole(gc.grid_size, "gtv_proxy_variance.grid_size", at_least=2),
                 extent, ring, far, whole(gc.mc_draws, "gtv_proxy_variance.mc_draws", at_least=2 * MC_BATCHES),
                 int(cfg.seed), flag(cfg.solver.progress, "solver.progress"))


def check(cfg: DictConfig) -> None:
    checked(cfg)


def nearest_neighbours(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's nearest other point (index [M]) and its distance [M]."""
    dist = torch.cdist(points, points)
    dist.fill_diagonal_(float("inf"))
    nearest, index = dist.min(1)
    return index, nearest


def neighbour_midpoints(points: torch.Tensor) -> torch.Tensor:
    """The midpoints between each point and its nearest neighbour, each pair once [P, 2]."""
    index, _ = nearest_neighbours(points)
    pairs = sorted({tuple(sorted((i, int(j)))) for i, j in enumerate(index.tolist())})
    return torch.stack([(points[i] + points[j]) / 2 for i, j in pairs])


def rings(points: torch.Tensor, fraction: float) -> torch.Tensor:
    """``RING_DIRECTIONS`` points around each point at ``fraction`` of its nearest-neighbour distance."""
    _, nearest = nearest_neighbours(points)
    angle = torch.arange(RING_DIRECTIONS, dtype=F64) * (2 * torch.pi / RING_DIRECTIONS)
    unit = torch.stack([angle.cos(), angle.sin()], 1)
    return (points[:, None, :] + fraction * nearest[:, None, None] * unit).reshape(-1, 2)


def monte_carlo_trace(measure: GaussianMixture, z: torch.Tensor, sigma: torch.Tensor, draws: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trace of the sample covariance of the proxy scores of ``draws`` posterior draws at
    each point of ``z`` [P, 2] (alpha = 1), and its standard error by batch means (the spread of
    the same trace over ``MC_BATCHES`` equal batches, over sqrt(MC_BATCHES))."""
    one = torch.ones((), dtype=F64)
    u = keyed_random.uniform((draws,), torch.arange(len(z)), seed=seed, stream=keyed_random.POSTERIOR, step=0)
    scores = proxy_score(measure.sample_posterior(z, one, sigma, u), z[:, None, :], one, sigma)  # [P, n, 2]

    def trace(x: torch.Tensor) -> torch.Tensor:
        return ((x - x.mean(-2, keepdim=True)) ** 2).sum((-2, -1)) / (x.shape[-2] - 1)

    size = draws // MC_BATCHES
    batches = trace(scores[:, :size * MC_BATCHES].reshape(len(z), MC_BATCHES, size, 2))  # [P, batches]
    return trace(scores), batches.std(1) / MC_BATCHES**0.5


def level_metrics(share: torch.Tensor, grid_far: torch.Tensor, between: torch.Tensor,
                  beside: torch.Tensor) -> dict[str, float]:
    """One (set, level) cell's numbers from the shares on the grid, at the midpoints and on the rings."""
    return {"between": float(between.mean()), "beside": float(beside.mean()),
            "far": float(share[grid_far].mean()) if grid_far.any() else float("nan"),
            "boundary_area": float((share > 0.5).double().mean())}


def run(cfg: DictConfig, run: RunDir) -> None:
    setup = checked(cfg)
    axis = torch.linspace(-setup.extent, setup.extent, setup.grid_size, dtype=F64)
    grid = torch.cartesian_prod(axis, axis)  # row i*G + j: (axis[i], axis[j])
    one = torch.ones((), dtype=F64)
    metrics: dict[str, dict] = {}
    shares, traces = [], []
    cells = [(name, level) for name in setup.sets for level in setup.levels]
    for name, level in progress.bar(cells, desc="gtv_proxy_variance", enabled=setup.show_progress):
        points = setup.sets[name]
        measure = GaussianMixture.empirical(points)
        sigma = torch.tensor(level, dtype=F64)
        share = variance_share(measure, grid, one, sigma)
        cov, _ = proxy_covariance(measure, grid, one, sigma)
        far = torch.cdist(grid, points).min(1).values > setup.far_distance
        mid = neighbour_midpoints(points)
        cell = level_metrics(share, far, variance_share(measure, mid, one, sigma),
                             variance_share(measure, rings(points, setup.ring), one, sigma))
        exact = proxy_covariance(measure, mid, one, sigma)[0].diagonal(dim1=-2, dim2=-1).sum(-1)
        mc, se = monte_carlo_trace(measure, mid, sigma, setup.mc_draws, setup.seed)
        cell["mc_relative_error"] = float(((mc - exact).abs() / exact).max())
        cell["mc_error_in_se"] = float(((mc - exact).abs() / se).max())
        metrics.setdefault(name, {})[f"{level:g}"] = cell
        shares.append(share.view(setup.grid_size, setup.grid_size).numpy())
        traces.append(cov.diagonal(dim1=-2, dim2=-1).sum(-1).view(setup.grid_size, setup.grid_size).numpy())

    claims = _claims(metrics, setup.levels)
    shape = (len(setup.sets), len(setup.levels), setup.grid_size, setup.grid_size)
    arrays = {"share": np.stack(shares).reshape(shape), "trace_c": np.stack(traces).reshape(shape),
              "axis": axis.numpy(), "noise_levels": np.array(setup.levels), "sets": np.array(list(setup.sets)),
              **{f"points/{name}": p.numpy() for name, p in setup.sets.items()}}
    run.save_arrays("arrays", arrays)
    figures = run.save_figure(plots.variance_share_maps(arrays["share"], axis.numpy(), setup.levels, setup.sets),
                              "fig1_proxy_variance")
    cells = [c for row in metrics.values() for c in row.values()]
    run.write_summary({"sets": metrics, "claims": claims,
                       "mc_relative_error_max": max(c["mc_relative_error"] for c in cells),
                       "mc_error_in_se_max": max(c["mc_error_in_se"] for c in cells)},
                      definitions=DEFINITIONS, noise_levels=setup.levels, grid_size=setup.grid_size,
                      extent=setup.extent, mc_draws=setup.mc_draws, figures=figures)


def _claims(metrics: dict[str, dict], levels: list[float]) -> dict[str, dict[str, bool]]:
    """The figure's claims per set: at the smallest level, high between neighbours (> 0.9), low
    beside the points and far from all (< 0.1); the boundary area growing with the level."""
    small = f"{levels[0]:g}"
    out = {}
    for name, row in metrics.items():
        areas = [row[f"{v:g}"]["boundary_area"] for v in levels]
        out[name] = {"high_between_neighbours": row[small]["between"] > 0.9,
                     "low_beside_points": row[small]["beside"] < 0.1,
                     "low_far_from_points": bool(row[small]["far"] < 0.1),  # NaN (no far grid point) is False
                     "boundary_widens": all(b > a for a, b in zip(areas, areas[1:], strict=False))}
    return out
