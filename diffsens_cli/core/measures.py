"""Closed-form diffused measures: isotropic Gaussian mixtures and empirical measures.

A target ``X ~ sum_k w_k N(mu_k, std_k^2 I)`` diffused to ``Z = alpha X + sigma eps`` is
again a mixture, with components ``N(alpha mu_k, C_k I)``, ``C_k = alpha^2 std_k^2 +
sigma^2``.  An empirical measure is the case ``std_k = 0`` (paper Eqs. 9-11).  Densities
are computed in log space, and everything is chunked over components with an online
log-sum-exp so that memory is ``O(B * chunk)`` whatever the number of components.

The score Jacobian uses the centred form of the related Fisher paper (Prop. 1):
``J s = -(sum_k r_k / C_k) I + sum_k r_k (s_k - s)(s_k - s)^T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DiffusedStats:
    """Log-density and score of a diffused mixture at a batch of points, and optionally
    its score Jacobian applied to tangents and its exact trace."""

    log_density: torch.Tensor  # [B]
    score: torch.Tensor  # [B, d]
    jvp: torch.Tensor | None = None  # [n, B, d]
    trace: torch.Tensor | None = None  # [B]
    quadratic: torch.Tensor | None = None  # [h, B]: e^T J_z s e


class GaussianMixture:
    """An isotropic Gaussian mixture (or, with zero stds, an empirical measure) on R^d."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, chunk_size: int = 2048):
        if means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=means.dtype, device=means.device).expand(k).clone()
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device).expand(k).clone()
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.means = means
        self.sq_norms = (means * means).sum(-1)
        self.stds = stds
        self.log_weights = torch.log(weights / weights.sum())
        self.chunk_size = chunk_size

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def memory_per_sample(self, num_tangents: int, itemsize: int) -> int:
        """Bytes of the intermediates one point needs in ``diffused``."""
        k = min(self.chunk_size, self.means.shape[0])
        return itemsize * (self.dim + k) * (num_tangents + 4)

    @classmethod
    def empirical(cls, points: torch.Tensor, chunk_size: int = 2048) -> GaussianMixture:
        """The uniform empirical measure on the rows of ``points`` (flattened)."""
        points = points.flatten(1)
        k = points.shape[0]
        return cls(points, torch.zeros(k, dtype=points.dtype), torch.ones(k, dtype=points.dtype), chunk_size)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GaussianMixture:
        out = GaussianMixture.__new__(GaussianMixture)
        out.means = self.means.to(device=device, dtype=dtype)
        out.sq_norms = self.sq_norms.to(device=device, dtype=dtype)
        out.stds = self.stds.to(device=device, dtype=dtype)
        out.log_weights = self.log_weights.to(device=device, dtype=dtype)
        out.chunk_size = self.chunk_size
        return out

    def mix(self, other: GaussianMixture, eta: float | list[float]) -> GaussianMixture:
        """The mixture ``(1 - eta) self + eta other`` (paper's ``rho^eta``).

        A list of ``R`` values gives a family of ``R`` mixtures that share components:
        its log-weights are ``[R, K]`` and it evaluates a batch as ``R`` equal,
        consecutive groups of points, group ``r`` under mixture ``r``.
        """
        etas = torch.as_tensor(eta, dtype=self.means.dtype, device=self.means.device)
        out = GaussianMixture.__new__(GaussianMixture)
        out.means = torch.cat([self.means, other.means])
        out.sq_norms = torch.cat([self.sq_norms, other.sq_norms])
        out.stds = torch.cat([self.stds, other.stds])
        e = etas[..., None]
        out.log_weights = torch.cat([self.log_weights + torch.log1p(-e), other.log_weights + torch.log(e)], -1)
        out.chunk_size = min(self.chunk_size, other.chunk_size)
        return out

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples of the (undiffused) measure."""
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return self.means[idx] + self.stds[idx, None] * noise

    def sample_diffused(self, n: int, alpha: torch.Tensor, sigma: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        """``n`` samples of ``alpha X + sigma eps``, ``X`` from this measure."""
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return alpha * self.sample(n, generator) + sigma * noise

    def diffused(
        self,
        z: torch.Tensor,
        alpha: torch.Tensor,
        sigma: torch.Tensor,
        tangents: torch.Tensor | None = None,
        trace: bool = False,
        quadratic: torch.Tensor | None = None,
    ) -> DiffusedStats:
        """Log-density and score of the measure diffused to ``alpha X + sigma eps`` at ``z``.

        ``tangents`` [n, B, d] asks for ``J_z s`` applied to each; ``trace`` for ``tr J_z s``;
        ``quadratic`` [h, B, d] for ``e^T J_z s e`` of each (Hutchinson's terms).
        Passes over the component chunks: the log-normaliser, then the score from exact
        responsibilities, then (only when asked) the centred second moments.  With a
        single chunk the component terms are computed once and reused.
        """
        b, d = z.shape
        z2 = (z * z).sum(-1, keepdim=True)  # [B, 1]
        starts = range(0, self.means.shape[0], self.chunk_size)
        cached = self._chunk(z, z2, alpha, sigma, 0) if len(starts) == 1 else None

        def chunks():
            for start in starts:
                yield cached if cached is not None else self._chunk(z, z2, alpha, sigma, start)

        lse = None
        for _, _, logit, _ in chunks():
            part = torch.logsumexp(logit, -1, keepdim=True)
            lse = part if lse is None else torch.logaddexp(lse, part)
        rc_sum, weighted = 0, 0
        for mu, c, logit, _ in chunks():
            rc = torch.exp(logit - lse) / c  # r_k / C_k
            rc_sum = rc_sum + rc.sum(-1, keepdim=True)
            weighted = weighted + rc @ mu
        score = alpha * weighted - z * rc_sum
        stats = DiffusedStats(log_density=lse.squeeze(-1), score=score)
        if tangents is None and not trace and quadratic is None:
            return stats

        # Centred second moments: sum_k r_k (s_k - s)(s_k - s)^T with s_k = (alpha mu_k - z) / C_k.
        zs = torch.stack([z, score], 1)  # [B, 2, d]

        def centred(x: torch.Tensor):
            """For vectors x [n, B, d]: a function of a chunk giving (s_k - s).x [n, B, Kc]."""
            xz, xs = torch.einsum("nbd,bjd->nbj", x, zs).split(1, -1)
            return lambda mu, c: (alpha * (x @ mu.T) - xz) / c - xs

        if trace:
            centred_sq = torch.zeros(b, 1, dtype=z.dtype, device=z.device)
            along_score = centred(score[None])
            s_s = (score * score).sum(-1, keepdim=True)
        if tangents is not None:
            along_tangents = centred(tangents)
            acc = torch.zeros_like(tangents)
        if quadratic is not None:
            along_probes = centred(quadratic)
            quad = -rc_sum[..., 0] * torch.linalg.vector_norm(quadratic, dim=-1) ** 2
        for mu, c, logit, sq in chunks():
            r = torch.exp(logit - lse)  # [B, Kc]
            if trace:  # |s_k - s|^2 = |s_k|^2 - 2 (s_k - s).s - |s|^2
                centred_sq = centred_sq + (r * (sq / c**2 - 2 * along_score(mu, c)[0] - s_s)).sum(-1, keepdim=True)
            if tangents is not None:
                w = r * along_tangents(mu, c)  # r_k (s_k - s).v
                wc = w / c
                acc = acc + alpha * (wc @ mu) - z * wc.sum(-1, keepdim=True) - score * w.sum(-1, keepdim=True)
            if quadratic is not None:
                quad = quad + (r * along_probes(mu, c) ** 2).sum(-1)
        if quadratic is not None:
            stats.quadratic = quad
        if tangents is not None:
            stats.jvp = acc - rc_sum * tangents
        if trace:
            stats.trace = (centred_sq - d * rc_sum).squeeze(-1)
        return stats

    def posterior(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Responsibilities ``p(k | z)`` [B, K] of the components for points ``z`` [B, d] of the
        diffused measure (GtV Eq. 32), from log-space weights (no underflow at small sigma)."""
        logit, _ = self.component_log_densities(z, alpha, sigma)
        return torch.softmax(logit + self.log_weights, -1)

    def posterior_components(self, z: torch.Tensor, alpha: torch.Tensor,
                             sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``X | alpha X + sigma eps = z`` as a mixture: responsibilities ``r_k`` [B, K], and
        given component k a Gaussian with mean ``m_k = mu_k + (alpha std_k^2 / C_k)(z - alpha mu_k)``
        [B, K, d] and variance ``v_k = std_k^2 sigma^2 / C_k`` [K] per coordinate.  Not chunked:
        it holds B K d numbers (the posterior methods serve low-dimensional sets)."""
        c = alpha**2 * self.stds**2 + sigma**2
        gain = alpha * self.stds**2 / c
        m_k = self.means + gain[:, None] * (z[:, None, :] - alpha * self.means)
        return self.posterior(z, alpha, sigma), m_k, self.stds**2 * sigma**2 / c

    def posterior_moments(self, z: torch.Tensor, alpha: torch.Tensor,
                          sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [B, d] and covariance [B, d, d] of ``X | alpha X + sigma eps = z``, the latter
        in the centred form ``sum_k r_k (v_k I + (m_k - m)(m_k - m)^T)`` (no cancellation)."""
        r, m_k, v = self.posterior_components(z, alpha, sigma)
        mean = (r[..., None] * m_k).sum(1)
        dev = m_k - mean[:, None, :]
        eye = torch.eye(self.dim, dtype=z.dtype, device=z.device)
        return mean, torch.einsum("bk,bki,bkj->bij", r, dev, dev) + (r * v).sum(-1)[:, None, None] * eye

    def sample_posterior(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, uniforms: torch.Tensor,
                         normals: torch.Tensor | None = None) -> torch.Tensor:
        """Draws of ``X | alpha X + sigma eps = z`` [B, R, d]: the component by inverting the
        responsibilities' distribution function at ``uniforms`` [B, R], then (for components with
        std > 0) its Gaussian part from ``normals`` [B, R, d]."""
        r = self.posterior(z, alpha, sigma)
        k = torch.searchsorted(r.cumsum(-1), uniforms.to(r.dtype)).clamp_max(r.shape[1] - 1)  # [B, R]
        draws = self.means[k]  # [B, R, d]
        if not (self.stds > 0).any():
            return draws
        if normals is None:
            raise ValueError("components with std > 0 need normals for the Gaussian part of a posterior draw")
        c = alpha**2 * self.stds[k] ** 2 + sigma**2  # [B, R]
        gain = alpha * self.stds[k] ** 2 / c
        spread = self.stds[k] * sigma / c.sqrt()
        return draws + gain[..., None] * (z[:, None, :] - alpha * draws) + spread[..., None] * normals

    def component_log_densities(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                                index: slice | torch.Tensor = slice(None),
                                z2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``log N(z; alpha mu_k, C_k I)`` [B, K'] of the diffused components ``index`` (without
        the mixture weights), and the squared distances ``|z - alpha mu_k|^2`` [B, K']."""
        mu = self.means[index]  # [K', d]
        c = alpha**2 * self.stds[index] ** 2 + sigma**2  # [K']
        z2 = (z * z).sum(-1, keepdim=True) if z2 is None else z2
        sq = (z2 - 2 * alpha * (z @ mu.T) + alpha**2 * self.sq_norms[index]).clamp_min(0)  # [B, K']
        return -sq / (2 * c) - 0.5 * z.shape[1] * torch.log(2 * math.pi * c), sq

    def _chunk(self, z, z2, alpha, sigma, start):
        """Means, variances, log-weighted log-densities and squared distances
        ``|z - alpha mu_k|^2`` of one chunk of components."""
        stop = start + self.chunk_size
        mu = self.means[start:stop]  # [Kc, d]
        c = alpha**2 * self.stds[start:stop] ** 2 + sigma**2  # [Kc]
        logit, sq = self.component_log_densities(z, alpha, sigma, slice(start, stop), z2)
        lw = self.log_weights[..., start:stop]
        if lw.ndim == 2:  # a family: R consecutive groups of points, one mixture each
            logit = (logit.view(lw.shape[0], -1, logit.shape[-1]) + lw[:, None]).view_as(logit)
        else:
            logit = logit + lw
        return mu, c, logit, sq
