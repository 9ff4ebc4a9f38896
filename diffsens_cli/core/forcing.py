"""The forcing terms of the sensitivity equation (paper Eq. 2's ``c_t g_t``): what a
perturbation of the training distribution adds to ``d psi/dt``, tangent by tangent.

``Perturbation``: K closed-form measures ``nu_k`` (Gaussian mixtures, empirical sets),
each weighted by ``nu_t / rho_t`` (paper Eq. 1, ``score_sensitivity``).
``EmpiricalForcing``: the point masses of N training points, one tangent per point or
mixtures of them, with the inner products the adjoint of ``core.influence`` needs.
Both follow ``Forcing``, what the integrator of ``core.integrate`` calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import Coefficients
from diffsens_cli.core.score_sensitivity import WeightStats, score_sensitivity, weight


class Forcing(Protocol):
    """What the integrator needs from a perturbation: K tangents and their forcings."""

    def __len__(self) -> int: ...

    def select(self, ks: slice) -> Forcing: ...

    def rows(self, sl: slice) -> Forcing: ...

    def forcing(self, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor, s_rho: torch.Tensor,
                clamp: tuple[float, float] | None, weights: list[WeightStats]) -> torch.Tensor: ...

    def memory_per_sample(self, itemsize: int) -> int: ...

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Forcing: ...


@dataclass
class Perturbation:
    """K closed-form perturbation measures ``nu_k``, integrated together along one path;
    ``signs[k] = -1`` removes ``nu_k`` instead of adding it."""

    measures: list[GaussianMixture]
    signs: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.measures:
            raise ValueError("a perturbation needs at least one measure")
        self.signs = [1.0] * len(self.measures) if self.signs is None else [float(s) for s in self.signs]
        if len(self.signs) != len(self.measures):
            raise ValueError(f"{len(self.measures)} measures but {len(self.signs)} signs")

    def __len__(self) -> int:
        return len(self.measures)

    def select(self, ks: slice) -> Perturbation:
        """The measures ``ks`` (a chunk of tangents)."""
        return Perturbation(self.measures[ks], self.signs[ks])

    def rows(self, sl: slice) -> Perturbation:
        """The perturbation of the samples ``sl`` (a chunk of rows): the same measures."""
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Perturbation:
        return Perturbation([m.to(device, dtype) for m in self.measures], self.signs)

    def forcing(self, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor, s_rho: torch.Tensor,
                clamp: tuple[float, float] | None, weights: list[WeightStats]) -> torch.Tensor:
        """``sign_k g^k_t(z)`` (paper Eq. 1) for every measure: [K, B, *event]; each
        measure's weights are counted in its own ``weights[k]``."""
        out = []
        for measure, sign, stats in zip(self.measures, self.signs, weights, strict=True):
            nu = measure.diffused(z.flatten(1), co.alpha, co.sigma)
            out.append(sign * score_sensitivity(nu.log_density, nu.score.view_as(z), log_rho, s_rho, clamp, stats))
        return torch.stack(out)

    def memory_per_sample(self, itemsize: int) -> int:
        """Bytes of the intermediates one point needs while the forcing is formed."""
        return max(m.memory_per_sample(0, itemsize) for m in self.measures)


def point_blocks(points: torch.Tensor, block: int | None,
                 device: torch.device) -> Iterator[tuple[slice, GaussianMixture]]:
    """The rows of ``points`` [N, d] ``block`` at a time (None: all), each block moved to
    ``device`` as the empirical measure of its points: how a training set larger than the
    device's memory is streamed from host memory."""
    n = len(points)
    step = n if block is None else block
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        yield rows, GaussianMixture.empirical(points[rows].to(device, non_blocking=True))


class EmpiricalForcing:
    """The forcing of the sensitivities to training points ``points`` [N, *event].

    Tangent ``k`` is either the point mass of point ``index[k]`` (``mix`` None: one
    tangent per point, the ``exact`` method) or the combination ``sum_n mix[k, b, n]
    delta_{x_n}`` for sample ``b`` (``mix`` [K, B, N]).  The weights of all points are
    counted together, in the first entry of the list the integrator passes (so the
    integration's ``weights`` hold the counts at the first tangent of each tangent chunk:
    sum them).

    ``block``: the points stay where they are (host memory, for a training set larger
    than the device's) and are moved to the device of the samples ``z`` ``block`` at a
    time, at each use; None: ``to`` moves them all there once.  The sums over points then
    run block by block, which changes their last bits only."""

    def __init__(self, points: torch.Tensor, index: torch.Tensor | None = None, mix: torch.Tensor | None = None,
                 block: int | None = None):
        if index is not None and mix is not None:
            raise ValueError("give the tangents' points (index) or their mixture weights (mix), not both")
        self.measure = GaussianMixture.empirical(points)  # one component per point: their log-densities
        self.mix = mix
        self.index = None if mix is not None else (torch.arange(len(points)) if index is None else index)
        self.block = block
        self._chosen: GaussianMixture | None = None  # streamed: the tangents' points, once moved

    def __len__(self) -> int:
        return len(self.index) if self.mix is None else self.mix.shape[0]

    def select(self, ks: slice) -> EmpiricalForcing:
        return self._with(index=self.index[ks] if self.mix is None else None,
                          mix=self.mix[ks] if self.mix is not None else None)

    def rows(self, sl: slice) -> EmpiricalForcing:
        return self if self.mix is None else self._with(index=None, mix=self.mix[:, sl])

    @property
    def points(self) -> torch.Tensor:
        """The training points, flattened: [N, d] (on the host when streamed)."""
        return self.measure.means

    @property
    def streamed(self) -> bool:
        return self.block is not None and self.block < len(self.points)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> EmpiricalForcing:
        """On ``device`` in ``dtype``; streamed points (and the indices into them) stay where they are."""
        here = self.points.device if self.streamed else device
        return EmpiricalForcing(self.points.to(here, dtype), None if self.index is None else self.index.to(here),
                                None if self.mix is None else self.mix.to(device, dtype), self.block)

    def _with(self, index: torch.Tensor | None, mix: torch.Tensor | None) -> EmpiricalForcing:
        out = EmpiricalForcing.__new__(EmpiricalForcing)
        out.measure, out.index, out.mix, out.block, out._chosen = self.measure, index, mix, self.block, None
        return out

    def _blocks(self, device: torch.device) -> Iterator[tuple[slice, GaussianMixture]]:
        """The points' positions and their measure on ``device``: all at once, or ``block``
        at a time when streamed."""
        if self.streamed:
            yield from point_blocks(self.points, self.block, device)
        else:
            yield slice(0, len(self.points)), self.measure

    def _tangent_points(self, device: torch.device) -> GaussianMixture:
        """Streamed: the measure of the tangents' own points on ``device``, moved once."""
        if self._chosen is None or self._chosen.means.device != device:
            self._chosen = GaussianMixture.empirical(self.points[self.index.to(self.points.device)].to(device))
        return self._chosen

    def memory_per_sample(self, itemsize: int) -> int:
        n, d = self.points.shape
        width = min(n, self.block) if self.streamed else n  # the weights' temporaries: a block's
        return itemsize * (2 * width + n * (self.mix.shape[0] if self.mix is not None else 0) + 2 * d)

    def point_weights(self, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor,
                      clamp: tuple[float, float] | None, stats: WeightStats | None,
                      measure: GaussianMixture | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """``nu^n_t / rho_t`` [B, N'] at ``z`` [B, d] for the points ``index`` of ``measure``
        (default: all the points), each clamped on its own."""
        measure = self.measure if measure is None else measure
        log_nu, _ = measure.component_log_densities(z, co.alpha, co.sigma, slice(None) if index is None else index)
        return weight(log_nu, log_rho[:, None], clamp, stats)

    def forcing(self, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor, s_rho: torch.Tensor,
                clamp: tuple[float, float] | None, weights: list[WeightStats]) -> torch.Tensor:
        """``g^k_t(z)`` [K, B, *event] of every tangent (paper Eq. 1, per point)."""
        zf, sf = z.flatten(1), s_rho.flatten(1)
        var = co.sigma**2
        shift = zf / var + sf  # s^n - s_rho = alpha x_n / sigma^2 - shift
        if self.mix is None:
            if self.streamed:  # the tangents' own points, moved to the device
                measure = self._tangent_points(z.device)
                chosen = measure.means
                w = self.point_weights(zf, co, log_rho, clamp, weights[0], measure).T
            else:
                chosen = self.points[self.index]
                w = self.point_weights(zf, co, log_rho, clamp, weights[0], index=self.index).T  # [K, B]
            g = w[..., None] * (co.alpha / var * chosen[:, None] - shift)
        else:
            pulled, total = 0, 0
            for rows, measure in self._blocks(z.device):
                c = self.mix[..., rows] * self.point_weights(zf, co, log_rho, clamp, weights[0], measure)  # [K, B, N']
                pulled, total = pulled + c @ measure.means, total + c.sum(-1, keepdim=True)
            g = co.alpha / var * pulled - total * shift
        return g.view(len(g), *z.shape)

    def inner(self, lam: torch.Tensor, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor,
              s_rho: torch.Tensor, clamp: tuple[float, float] | None, stats: WeightStats | None) -> torch.Tensor:
        """``<g^n_t(z_b), lam[j, b]>`` [m, B, N] for every point n: an ``N x d`` product."""
        zf, sf, lf = z.flatten(1), s_rho.flatten(1), lam.flatten(2)
        var = co.sigma**2
        shift = (lf * (zf / var + sf)).sum(-1, keepdim=True)  # [m, B, 1]
        parts = [self.point_weights(zf, co, log_rho, clamp, stats, measure)  # [B, N']
                 * (co.alpha / var * (lf @ measure.means.T) - shift) for _, measure in self._blocks(z.device)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
