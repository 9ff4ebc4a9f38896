"""Attribution scores built on the per-image sensitivities, and the numbers that say what
they are (docs/design.md sections 7 and 12).

- ``set_order``: a ranking for removing k images together.  Removing a set R changes a
  sample to first order by ``-(1 / (N - k)) sum_{n in R} psi^n`` (``core.counterfactual``),
  so the images worth removing together are those whose sensitivities add up, not the
  largest one by one: a greedy choice maximising ``|sum_{n in R} psi^n|``.
- ``loss_sensitivity``: the first-order change of a query's denoising loss when the
  weight of training image n grows (paper Eq. 1 in place of the sample's Eq. 2): the
  field's output for attribution (D-TRAK, TRAK, K-FAC influence score the loss).
- ``affine_r2``: how close ``psi^n`` is to an affine function ``A x_n + b`` of the image,
  what the weight clamp's floor makes it (with every weight at the floor the forcing
  ``0.1 (alpha x_n - z) / sigma^2 - 0.1 s`` is affine in x_n, and so is psi^n).
"""

from __future__ import annotations

import math

import torch

from diffsens_cli.core.forcing import point_blocks
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.core.score_sensitivity import WeightStats, weight


def set_order(vectors: torch.Tensor) -> torch.Tensor:
    """The images' order [N] for removal together, from their sensitivities (or their
    projections) ``vectors`` [N, m]: each next image is the one that makes the sum of the
    chosen ones longest, ``argmax_n |S + v_n|^2 = |S|^2 + 2 S.v_n + |v_n|^2``.  The
    order is nested, so its top k is the greedy set for every k.  O(N^2 m)."""
    v = vectors.double()
    n = len(v)
    sq = v.pow(2).sum(-1)
    total = torch.zeros(v.shape[1], dtype=v.dtype, device=v.device)
    taken = torch.zeros(n, dtype=torch.bool, device=v.device)
    order = torch.empty(n, dtype=torch.long)
    for step in range(n):
        gain = (2 * (v @ total) + sq).masked_fill(taken, -math.inf)
        pick = int(gain.argmax())
        order[step], taken[pick] = pick, True
        total += v[pick]
    return order


def rank_scores(order: torch.Tensor) -> torch.Tensor:
    """Scores [N] that sort as ``order`` does (first: N, last: 1), for rankings that have
    an order but no score of their own."""
    scores = torch.empty(len(order), dtype=torch.float64)
    scores[order] = torch.arange(len(order), 0, -1, dtype=torch.float64)
    return scores


@torch.no_grad()
def loss_sensitivity(model: ScoreModel, points: torch.Tensor, queries: torch.Tensor, times: torch.Tensor,
                     noises: torch.Tensor, clamp: tuple[float, float] | None,
                     stats: WeightStats | None = None, block: int | None = None) -> torch.Tensor:
    """``-dL_b / d eta_n`` [B, N]: how much the denoising loss of each query ``queries``
    [B, *event] falls when the training measure moves towards image n,
    ``rho^eta = (1 - eta) rho + eta delta_{x_n}`` (positive: a proponent, whose removal
    would raise the loss; negative: an opponent).

    The loss is the DDPM training loss at the fixed pairs ``(times[j], noises[j])``
    (``core.trak.output_pairs``, shared with D-TRAK's output): the mean over pairs and
    pixels of ``|eps_hat(z) - eps|^2`` at ``z = alpha x + sigma eps``, ``eps_hat = -sigma s``.
    Its derivative is ``E[grad_s L . g^n_t(z)]`` with Eq. 1's
    ``g^n = w_n (alpha x_n / sigma^2 - z / sigma^2 - s)``.  The weight ``w_n = nu_t / rho_t``
    takes ``rho_t`` as the diffused training set (``N p(n | z)``, exact for the optimal
    score): these points are off the sampler's path, where CCoV gives no density without
    an ODE solve back to t0 from each of them.  ``block``: the points are moved to the
    queries' device that many at a time (as ``EmpiricalForcing``'s), once per pair."""
    d, n = queries[0].numel(), len(points)
    streamed = block is not None and block < n
    resident = None if streamed else [m for _, m in point_blocks(points.flatten(1), None, queries.device)]
    out = torch.zeros(len(queries), n, dtype=torch.float64, device=queries.device)
    for t, eps in zip(times, noises):
        alpha, sigma = model.schedule.alpha(t), model.schedule.sigma(t)
        z = alpha * queries + sigma * eps
        s = model.score(z, t)
        zf, sf = z.flatten(1), s.flatten(1)
        u = 2 * sigma * (sigma * sf + eps.flatten()) / d  # grad_s of the pair's mean squared error
        log_nu, toward = [], []  # [B, N'] per block: log-densities, and u's products with the points
        for m in resident or (m for _, m in point_blocks(points.flatten(1), block, queries.device)):
            log_nu.append(m.component_log_densities(zf, alpha, sigma)[0])
            toward.append(u @ m.means.T)
        log_nu = torch.cat(log_nu, -1)
        log_rho = torch.logsumexp(log_nu, -1, keepdim=True) - math.log(n)
        w = weight(log_nu, log_rho, clamp, stats)
        out += (w * (alpha / sigma**2 * torch.cat(toward, -1)
                     - (u * (zf / sigma**2 + sf)).sum(-1, keepdim=True))).double()
    return -out / len(times)


@torch.no_grad()
def denoising_loss(model: ScoreModel, queries: torch.Tensor, times: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
    """The loss of ``loss_sensitivity`` [B] itself (for its finite-difference test)."""
    total = torch.zeros(len(queries), dtype=torch.float64, device=queries.device)
    for t, eps in zip(times, noises):
        z = model.schedule.alpha(t) * queries + model.schedule.sigma(t) * eps
        total += (model.schedule.sigma(t) * model.score(z, t) + eps).flatten(1).pow(2).mean(-1).double()
    return total / len(times)


def principal_basis(images: torch.Tensor, components: int | None = None) -> torch.Tensor:
    """An orthonormal basis [N, k] of the centred images' top ``components`` principal
    directions over the N images (default ``min(d, N // 4)``; directions of zero spread,
    such as the digits' constant borders, dropped): the regressors of ``affine_r2``, one
    SVD for every set of targets."""
    x = images.flatten(1).double()
    n, d = x.shape
    k = min(d, n // 4) if components is None else components
    u, sv, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return u[:, :k][:, sv[:k] > sv[0] * 1e-10]


def affine_r2(targets: torch.Tensor, basis: torch.Tensor) -> float:
    """R^2 of the least-squares fit ``targets_n ~ A x_n + b`` [N, m] on the images' top
    principal components ``basis`` (``principal_basis``): 1 - residual / total sum of
    squares over all n and coordinates.

    ``targets`` may be the sensitivities' projections on orthonormal directions (scaled
    alike): the fit of each projected coordinate is the projection of the full fit, so the
    ratio estimates the full R^2 (exact for m = d).  With few images a fit on every pixel
    is perfect whatever the targets; keeping k principal components, chance alone gives
    about ``k / N``."""
    yc = targets.double() - targets.double().mean(0)
    return float((basis.T @ yc).pow(2).sum() / yc.pow(2).sum())


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The share of the top ``k`` by scores ``a`` [N] that are in the top ``k`` by ``b``."""
    top_a = set(torch.argsort(a, descending=True)[:k].tolist())
    top_b = set(torch.argsort(b, descending=True)[:k].tolist())
    return len(top_a & top_b) / k
