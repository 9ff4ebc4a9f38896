"""Comparing sensitivities with each other and with actual changes (DESIGN.md section 6)."""

from __future__ import annotations

import torch


def correlation(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-row correlation of two batches [B, *event]: each row flattened, centred, and
    compared by cosine (``numpy.corrcoef`` of the pair, paper App. F.1.2).  A constant
    row has no correlation: NaN."""
    u = u.flatten(1).double()
    v = v.flatten(1).double()
    u = u - u.mean(1, keepdim=True)
    v = v - v.mean(1, keepdim=True)
    return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))


def cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of two batches [B, *event], uncentred: the agreement of directions."""
    u = u.flatten(1).double()
    v = v.flatten(1).double()
    return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))


SIMILARITIES = {"correlation": correlation, "cosine": cosine}
