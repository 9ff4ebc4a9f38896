"""Comparing sensitivities with each other and with actual changes (docs/design.md section 6)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata


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


def relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a - b| / |b|`` per row of two batches [B, *event] (each row flattened)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def linear_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares lines ``y ~ slope x + intercept`` per row of [M, N] (float64), and
    each fit's r^2 (the squared correlation of x and y)."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    slope = (xc * yc).sum(-1) / (xc * xc).sum(-1)
    intercept = y.mean(-1) - slope * x.mean(-1)
    r2 = (xc * yc).sum(-1) ** 2 / ((xc * xc).sum(-1) * (yc * yc).sum(-1))
    return slope, intercept, r2


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's correlation of each row of two [M, J] arrays: ``correlation`` of the
    ranks along the last axis, ties sharing their average rank (a constant row: NaN; a
    subset the bootstrap draws twice is one tie)."""
    ranks = (torch.from_numpy(rankdata(v, axis=-1)) for v in (x, y))
    return correlation(*ranks).numpy()


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of two vectors (``spearman_rows`` of one row)."""
    rows = (v.detach().flatten().double().cpu().numpy()[None] for v in (x, y))
    return torch.tensor(spearman_rows(*rows)[0], dtype=torch.float64)
