"""Score sensitivity (paper Eq. 1): ``g_t = nu_t / rho_t (s^nu_t - s^rho_t)``, in log space.

The weight ``nu_t / rho_t`` under- or overflows in image dimensions, so it is formed as
``exp(log nu - log rho)`` with an optional clamp; clamped and non-finite weights are
counted (never silently passed on) and reported in the run's summary, and so are the
weights that do not fit the working dtype: ``underflow`` (exp gives 0, e.g. a log
weight of -200 in float32, whose smallest subnormal is about e^-103.3, or a log of nu_t
that overflowed to -inf) and
``overflow`` (exp gives inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class WeightStats:
    """Running counts of how the weights ``nu_t / rho_t`` were treated (kept on device); with
    ``per_row``, one count per row of the batch (the weights' first axis), for runs whose
    rows are separate results (several model samples' influence in one pass)."""

    total: int = 0  # weights evaluated (per row, with per_row)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    per_row: bool = False

    def evaluated(self, values: torch.Tensor) -> None:
        self.total += values.numel() // values.shape[0] if self.per_row else values.numel()

    def add(self, name: str, mask: torch.Tensor) -> None:
        n = mask.flatten(1).sum(1) if self.per_row else mask.sum()
        self.counts[name] = self.counts[name] + n if name in self.counts else n

    def merge(self, other: WeightStats) -> None:
        """Add ``other``'s counts (of the same rows, with per_row)."""
        if other.per_row != self.per_row:
            raise ValueError("weight counts per row and in all cannot be merged")
        self.total += other.total
        for k, v in other.counts.items():
            self.counts[k] = self.counts[k] + v.to(self.counts[k].device) if k in self.counts else v

    def as_dict(self, row: int | None = None) -> dict[str, int]:
        """The counts, of one ``row`` (per_row only) or of all."""
        if row is not None and not self.per_row:
            raise ValueError("these weights were counted in all, not per row")
        rows = len(next(iter(self.counts.values()))) if self.per_row and self.counts else 1
        out = {"evaluated": self.total if row is not None else self.total * rows}
        for k in ("clamped_low", "clamped_high", "nonfinite", "underflow", "overflow"):
            v = self.counts.get(k)
            out[k] = 0 if v is None else int((v[row] if row is not None else v.sum()).item())
        return out


def log_weight(log_nu: torch.Tensor, log_rho: torch.Tensor, clamp: tuple[float, float] | None,
               stats: WeightStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(nu_t / rho_t)``, clamped to ``log clamp`` if given, and where it was no number:
    non-finite values (NaN, ``+inf``: rho_t's density underflowed) become ``-inf`` (zero
    forcing) and are counted."""
    lw = log_nu - log_rho
    bad = torch.isnan(lw) | (lw == math.inf)
    if stats is not None:
        stats.evaluated(lw)
        stats.add("nonfinite", bad)
    lw = torch.where(bad, torch.full_like(lw, -math.inf), lw)
    if clamp is not None:
        lo, hi = math.log(clamp[0]), math.log(clamp[1])
        if stats is not None:
            stats.add("clamped_low", (lw < lo) & ~bad)
            stats.add("clamped_high", lw > hi)
        lw = torch.where(bad, lw, lw.clamp(lo, hi))
    return lw, bad


def score_sensitivity(log_nu: torch.Tensor, s_nu: torch.Tensor, log_rho: torch.Tensor, s_rho: torch.Tensor,
                      clamp: tuple[float, float] | None = None, stats: WeightStats | None = None) -> torch.Tensor:
    """Paper Eq. 1 for a batch: log-densities [B], scores [B, *event]. Zero where the
    weight is zero, even if nu's score is not finite there (0 * inf would be NaN)."""
    w = weight(log_nu, log_rho, clamp, stats).view(-1, *([1] * (s_rho.ndim - 1)))
    return torch.where(w > 0, w * (s_nu - s_rho), 0.0)


def weight(log_nu: torch.Tensor, log_rho: torch.Tensor, clamp: tuple[float, float] | None,
           stats: WeightStats | None = None) -> torch.Tensor:
    """``nu_t / rho_t`` from its logs (``log_weight``), with under- and overflow counted.
    A log weight of ``-inf`` is an underflow too: nu_t is a Gaussian smoothing, positive
    everywhere, so ``log nu_t = -inf`` is a log-density that overflowed the dtype."""
    lw, bad = log_weight(log_nu, log_rho, clamp, stats)
    w = lw.exp()
    if stats is not None:
        stats.add("underflow", (w == 0) & ~bad)
        stats.add("overflow", w == math.inf)
    return w
