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
    def empirical(cls, points: torch.Tensor, chunk_size: int = 2048) -> "GaussianMixture":
        """The uniform empirical measure on the rows of ``points`` (flattened)."""
        points = points.flatten(1)
        k = points.shape[0]
        return cls(points, torch.zeros(k, dtype=points.dtype), torch.ones(k, dtype=points.dtype), chunk_size)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "GaussianMixture":
        out = GaussianMixture.__new__(GaussianMixture)
        out.means = self.means.to(device=device, dtype=dtype)
        out.stds = self.stds.to(device=device, dtype=dtype)
        out.log_weights = self.log_weights.to(device=device, dtype=dtype)
        out.chunk_size = self.chunk_size
        return out

    def mix(self, other: "GaussianMixture", eta: float) -> "GaussianMixture":
        """The mixture ``(1 - eta) self + eta other`` (paper's ``rho^eta``)."""
        out = GaussianMixture.__new__(GaussianMixture)
        out.means = torch.cat([self.means, other.means])
        out.stds = torch.cat([self.stds, other.stds])
        with torch.no_grad():
            lw = [self.log_weights + math.log1p(-eta) if eta < 1 else torch.full_like(self.log_weights, -math.inf),
                  other.log_weights + math.log(eta) if eta > 0 else torch.full_like(other.log_weights, -math.inf)]
        out.log_weights = torch.cat(lw)
        out.chunk_size = min(self.chunk_size, other.chunk_size)
        return out

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples of the (undiffused) measure."""
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return self.means[idx] + self.stds[idx, None] * noise

    def diffused(
        self,
        z: torch.Tensor,
        alpha: torch.Tensor,
        sigma: torch.Tensor,
        tangents: torch.Tensor | None = None,
        trace: bool = False,
    ) -> DiffusedStats:
        """Log-density and score of the measure diffused to ``alpha X + sigma eps`` at ``z``.

        ``tangents`` [n, B, d] asks for ``J_z s`` applied to each; ``trace`` for ``tr J_z s``.
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
        for amu, c, logit, _ in chunks():
            rc = torch.exp(logit - lse) / c  # r_k / C_k
            rc_sum = rc_sum + rc.sum(-1, keepdim=True)
            weighted = weighted + rc @ amu
        score = weighted - z * rc_sum
        stats = DiffusedStats(log_density=lse.squeeze(-1), score=score)
        if tangents is None and not trace:
            return stats

        # Centred second moments: sum_k r_k (s_k - s)(s_k - s)^T with s_k = (alpha mu_k - z) / C_k.
        if trace:
            centred_sq = torch.zeros(b, 1, dtype=z.dtype, device=z.device)
            z_s = (z * score).sum(-1, keepdim=True)
            s_s = (score * score).sum(-1, keepdim=True)
        if tangents is not None:
            zv = (tangents * z).sum(-1, keepdim=True)  # [n, B, 1]
            sv = (tangents * score).sum(-1, keepdim=True)
            acc = torch.zeros_like(tangents)
        for amu, c, logit, sq in chunks():
            r = torch.exp(logit - lse)  # [B, Kc]
            if trace:
                sk_s = (score @ amu.T - z_s) / c
                centred_sq = centred_sq + (r * (sq / c**2 - 2 * sk_s + s_s)).sum(-1, keepdim=True)
            if tangents is not None:
                w = r * ((tangents @ amu.T - zv) / c - sv)  # r_k (s_k - s).v  [n, B, Kc]
                wc = w / c
                acc = acc + wc @ amu - z * wc.sum(-1, keepdim=True) - score * w.sum(-1, keepdim=True)
        if tangents is not None:
            stats.jvp = acc - rc_sum * tangents
        if trace:
            stats.trace = (centred_sq - d * rc_sum).squeeze(-1)
        return stats

    def _chunk(self, z, z2, alpha, sigma, start):
        """Scaled means, variances, log-weighted log-densities and squared distances of
        one chunk of components."""
        stop = start + self.chunk_size
        amu = alpha * self.means[start:stop]  # [Kc, d]
        c = alpha**2 * self.stds[start:stop] ** 2 + sigma**2  # [Kc]
        sq = (z2 - 2 * z @ amu.T + (amu * amu).sum(-1)).clamp_min(0)  # [B, Kc]
        logit = self.log_weights[start:stop] - sq / (2 * c) - 0.5 * z.shape[1] * torch.log(2 * math.pi * c)
        return amu, c, logit, sq
