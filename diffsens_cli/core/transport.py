"""Entropic optimal-transport baseline (paper Sec. 4.3, App. F.2; docs/design.md section 6).

The baseline predicts the direction in which base sample ``x_i`` moves when the model is
retrained or fine-tuned towards targets ``y`` by its transport ray: the barycentric
projection of the entropic coupling ``P`` minus the sample itself,

    ray_i = sum_j P_ij y_j / sum_j P_ij - x_i,

with ``P`` the Sinkhorn coupling between uniform weights 1/N on ``x`` and weights ``b``
on ``y`` (uniform 1/M by default; the retraining target ``(1 - eta) rho + eta S`` weighs
its two point sets unequally), solved by POT's ``sinkhorn_log`` (reg 0.05 in the paper).

Cost normalisation: the cost matrix ``ot.dist(x, y, metric)`` ("euclidean" is
``||x - y||_2`` as in the paper's Eq. 7, "sqeuclidean" its square) is divided by its
maximum, as POT's own examples do, so that ``reg`` is relative to the largest cost and
means the same for 8x8 digits and 64x64 faces. The divisor is returned as ``cost_scale``.

Everything is float64 numpy on the CPU, with dense N x M matrices: fine up to about
10k x 10k (800 MB per matrix); there is no chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot
import torch

METRICS = ("euclidean", "sqeuclidean")


@dataclass
class TransportResult:
    """Transport rays of the base samples and how well the coupling met its marginals."""

    rays: torch.Tensor  # [N, *event] float, on the CPU, same dtype as x
    marginal_error: float  # max abs deviation of P's row and column sums from 1/N, b (relative to them)
    cost_scale: float  # the number the cost matrix was divided by


def transport_rays(
    x: torch.Tensor,
    y: torch.Tensor,
    reg: float = 0.05,
    metric: str = "euclidean",
    target_weights: torch.Tensor | None = None,
    num_iter_max: int = 10_000,
    stop_thr: float = 1e-9,
) -> TransportResult:
    """Entropic-OT transport rays from base samples x [N, *event] to targets y [M, *event]
    (with ``target_weights`` [M], normalised; default uniform).

    ``reg`` is relative to the largest cost (see the module docstring). POT's
    non-convergence warning is switched off because the result reports the marginal error
    instead, which says how far from converged the coupling is."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must have the same event shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    xf = x.detach().cpu().flatten(1).double().numpy()
    yf = y.detach().cpu().flatten(1).double().numpy()
    n, m = len(xf), len(yf)
    a = np.full(n, 1.0 / n)
    if target_weights is None:
        b = np.full(m, 1.0 / m)
    else:
        b = target_weights.detach().cpu().double().numpy()
        if b.shape != (m,) or not (b > 0).all():
            raise ValueError(f"target_weights must be {m} positive numbers, one per target")
        b = b / b.sum()

    cost = ot.dist(xf, yf, metric=metric)
    cost_scale = float(cost.max()) or 1.0  # all points equal: any scale, the rays are zero
    plan = ot.bregman.sinkhorn_log(a, b, cost / cost_scale, reg, numItermax=num_iter_max, stopThr=stop_thr, warn=False)

    rows, cols = plan.sum(1), plan.sum(0)
    marginal_error = max(np.abs(rows * n - 1).max(), np.abs(cols / b - 1).max())
    rays = plan @ yf / rows[:, None] - xf
    return TransportResult(
        rays=torch.from_numpy(rays).to(x.dtype).view(x.shape),
        marginal_error=float(marginal_error),
        cost_scale=cost_scale,
    )
