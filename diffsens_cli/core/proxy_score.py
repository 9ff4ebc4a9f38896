"""The proxy score of denoising score matching, its covariance, and the naive sampler built
from it (the related paper "Generalization through variance", GtV; docs/generalization.md).

For a target diffused to ``Z = alpha X + sigma eps`` the proxy score of a training point
``x0`` is ``s~(z; x0) = (alpha x0 - z) / sigma^2`` (GtV Eq. 5 with ``S_t = sigma^2 I``): what a
network trained by DSM regresses on.  Over ``X | Z = z`` its mean is the score ``s(z)`` and its
covariance ``C(z) = alpha^2 / sigma^4 Cov(X | z)`` (Eq. 34; the Fisher information of
``p(x0 | z)``, Eq. 30), the part of the loss no network removes (Eq. 24).  It equals
``I / sigma^2 + J_z s`` (Eq. 5), and ``E[|s~|^2 | z] = tr C + |s|^2``, so ``tr C / (tr C + |s|^2)``
in [0, 1] is the share of the regression target's second moment that is noise (GtV Fig. 1).

The naive sampler (Prop. 4.1, App. D) is forward Euler on the PF-ODE with the score at each
step replaced by the mean of ``R`` proxy scores of fresh posterior draws; its score noise has
covariance ``C / R``.  ``noise="gaussian"`` replaces the draws by Gaussian noise of the same
covariance: the effective SDE of Prop. 3.1 with Eq. 9's kernel, discretised on the same grid.
"""

from __future__ import annotations

import torch

from diffsens_cli.core import dynamics, keyed_random
from diffsens_cli.core.influence import reverse_pass
from diffsens_cli.core.integrate import Tape
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import Coefficients, Schedule
from diffsens_cli.core.score_model import ScoreModel

NOISES = ("posterior", "gaussian")


def proxy_score(x0: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``s~(z; x0) = (alpha x0 - z) / sigma^2`` (broadcasting ``x0`` against ``z``)."""
    return (alpha * x0 - z) / sigma**2


def proxy_covariance(measure: GaussianMixture, z: torch.Tensor, alpha: torch.Tensor,
                     sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``C(z) = Cov[s~ | z]`` [B, d, d] (GtV Eq. 34) and the score ``s(z) = E[s~ | z]`` [B, d]."""
    mean, cov = measure.posterior_moments(z, alpha, sigma)
    return alpha**2 / sigma**4 * cov, proxy_score(mean, z, alpha, sigma)


def variance_share(measure: GaussianMixture, z: torch.Tensor, alpha: torch.Tensor,
                   sigma: torch.Tensor) -> torch.Tensor:
    """``tr C / (tr C + |s|^2)`` [B] at ``z``: the noise share of the proxy score's second
    moment.  The common factor ``1 / sigma^4`` is left out of both terms, so it stays exact
    where ``sigma`` is small."""
    mean, cov = measure.posterior_moments(z, alpha, sigma)
    noise = alpha**2 * cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    signal = ((alpha * mean - z) ** 2).sum(-1)
    return noise / (noise + signal)


def naive_score(measure: GaussianMixture, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, draws: int, *,
                seed: int, step: int, ids: torch.Tensor, noise: str = "posterior") -> torch.Tensor:
    """GtV's naive score estimate [B, d] at ``z`` [B, d]: the mean of ``draws`` proxy scores of
    posterior draws (``posterior``), or the score plus Gaussian noise of covariance ``C / draws``
    (``gaussian``).  Random numbers are keyed by (seed, step, sample id), so a path's draws do
    not depend on which other paths share its batch."""
    b, d = z.shape
    if noise == "posterior":
        u = keyed_random.uniform((draws,), ids, seed=seed, stream=keyed_random.POSTERIOR, step=step)
        normals = None
        if (measure.stds > 0).any():
            normals = keyed_random.normal((draws, d), ids, seed=seed, stream=keyed_random.POSTERIOR_NOISE, step=step,
                                          dtype=z.dtype)
        x0 = measure.sample_posterior(z, alpha, sigma, u, normals)
        return proxy_score(x0, z[:, None, :], alpha, sigma).mean(1)
    if noise != "gaussian":
        raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")
    # C = alpha^2 / sigma^4 (sum_k r_k (m_k - m)(m_k - m)^T + sum_k r_k v_k I): a factor of it
    # is [sqrt(r_k) (m_k - m)]_k beside sqrt(sum_k r_k v_k) I, so no matrix root is needed.
    r, m_k, v = measure.posterior_components(z, alpha, sigma)
    mean = (r[..., None] * m_k).sum(1)
    k = r.shape[1]
    eps = keyed_random.normal((k + d,), ids, seed=seed, stream=keyed_random.EFFECTIVE_NOISE, step=step, dtype=z.dtype)
    spread = torch.einsum("bk,bkd->bd", r.sqrt() * eps[:, :k], m_k - mean[:, None, :])
    spread = spread + (r * v).sum(-1, keepdim=True).sqrt() * eps[:, k:]
    return proxy_score(mean + spread / draws**0.5, z, alpha, sigma)


def naive_sample(measure: GaussianMixture, schedule: Schedule, times: torch.Tensor, z0: torch.Tensor, draws: int, *,
                 seed: int, noise: str = "posterior", ids: torch.Tensor | None = None) -> torch.Tensor:
    """End points [B, d] of GtV's naive sampler from ``z0`` [B, d]: forward Euler on the PF-ODE
    along the grid ``times`` (paper time), the score at each step ``naive_score`` with fresh
    draws (App. D, Eq. 49-50).  ``ids`` name the paths for the random numbers (default 0..B-1)."""
    times = times.to(z0.device, z0.dtype)
    co = schedule.coefficients(times)
    ids = torch.arange(len(z0), device=z0.device) if ids is None else ids
    z = z0
    for k in range(len(times) - 1):
        at = Coefficients(co.alpha[k], co.sigma[k], co.a[k], co.c[k])
        s = naive_score(measure, z, at.alpha, at.sigma, draws, seed=seed, step=k, ids=ids, noise=noise)
        z = z + (times[k + 1] - times[k]) * dynamics.drift(at, z, s, dynamics.SCORE_GAIN["ode"])
    return z


def predicted_covariance(measure: GaussianMixture, model: ScoreModel, tape: Tape, draws: int,
                         show_progress: bool = False) -> torch.Tensor:
    """First-order covariance [B, d, d] of the naive sampler's end points from the starts of
    ``tape``, a forward-Euler PF-ODE tape of ``model`` (the exact score of ``measure``) on the
    sampler's grid: one reverse pass with the d unit cotangents, adding at each step the
    score noise ``C / draws`` pulled back to the end."""
    if tape.rule.name != "euler":
        raise ValueError(f"the naive sampler is forward Euler; a {tape.rule.name} tape has other noise terms")
    b, d = tape.z[0].shape
    eye = torch.eye(d, dtype=tape.z[0].dtype, device=tape.z[0].device)
    omega = eye[:, None, :].expand(d, b, d).contiguous()
    total = torch.zeros(b, d, d, dtype=omega.dtype, device=omega.device)

    def visit(lam: torch.Tensor, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor, s: torch.Tensor,
              weight: torch.Tensor) -> None:
        cov, _ = proxy_covariance(measure, z, co.alpha, co.sigma)
        total.add_(weight**2 * torch.einsum("ibx,bxy,jby->bij", lam, cov, lam))

    reverse_pass(model, tape, omega, visit, "predicted covariance", show_progress)
    return total / draws
