"""Predicted changes of model samples when training images are removed (docs/design.md
section 7), and the baseline they are judged against.

Removing a set R of k of N training images changes the empirical measure by
``sum_n w_n (delta_{x_n} - rho)`` with ``w_n = -1/(N - k)`` on R (the kept images'
share grows by as much as R's falls; the sensitivities of all N images sum to zero for
the exact score), so the first-order change of a model sample is ``sum_n w_n psi^n =
-(k / (N - k)) mean_{n in R} psi^n``: one forward tangent with the mixture weights of
``removal_mix`` (``core.forcing.EmpiricalForcing`` with ``mix``).

The baseline knows only distances: the shift of the Gaussian-kernel mean of the
training images around the sample when the removed ones leave it
(``kernel_removal_prediction``).
"""

from __future__ import annotations

import torch

from diffsens_cli.core.keyed_random import keyed_generator

PREDICTIONS = ("removed", "measure")


def removal_mix(removed: torch.Tensor, weights: str = "removed") -> torch.Tensor:
    """Mixture weights [R, N] of the first-order change after removing each row's images
    (a bool mask [R, N], k_r of N removed).

    ``removed``: ``-1 / (N - k)`` on the removed images only, the change
    ``-(k / (N - k)) mean_R psi^n``; it assumes the sensitivities of all N images sum to
    zero, as they do for the exact score without a weight clamp.  ``measure``: the change
    of every image's weight, ``1 / (N - k) - 1 / N`` on the kept and ``-1 / N`` on the
    removed ones (summing to zero), which assumes nothing of the sum: the two agree where
    it is zero and differ under a clamp or for a learned score."""
    n = removed.shape[1]
    kept = (~removed).sum(1, keepdim=True).double()
    if bool((kept == 0).any()):
        raise ValueError("a removal set removes every training image")
    if weights == "removed":
        return torch.where(removed, -1.0 / kept, torch.zeros((), dtype=torch.float64))
    if weights == "measure":
        return torch.where(removed, torch.full((), -1.0 / n, dtype=torch.float64), 1.0 / kept - 1.0 / n)
    raise ValueError(f"weights must be one of {PREDICTIONS}, got {weights!r}")


def top_k_mask(order: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask [N] of the first ``k`` entries of the ranking ``order`` (indices, most
    influential first)."""
    mask = torch.zeros(len(order), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def random_halves(n: int, keep: float, count: int, seed: int) -> torch.Tensor:
    """Bool masks [count, n] of the images kept by random subsets 0 .. count-1
    (round(keep * n) images each); subset j depends only on ``seed`` and j, so asking for
    more subsets keeps the earlier ones."""
    size = round(keep * n)
    masks = torch.zeros(count, n, dtype=torch.bool)
    for j in range(count):
        masks[j, torch.randperm(n, generator=keyed_generator("subset", seed, j))[:size]] = True
    return masks


def kernel_removal_prediction(x: torch.Tensor, points: torch.Tensor, removed: torch.Tensor,
                              bandwidth: float) -> torch.Tensor:
    """The L2-kernel baseline's change [R, M, d] of samples ``x`` [M, *event] after each
    removal (bool [R, N]): how the Gaussian-kernel mean of the training points around the
    sample, ``sum_n w_n x_n`` with ``w_n`` proportional to ``exp(-|x - x_n|^2 / (2 h^2))``,
    moves when the removed points leave it (a Nadaraya-Watson denoiser at bandwidth h).
    It equals ``-sum_{n in R} w_n (x_n - m) / (1 - W_R)``: the kernel-weighted ray from the
    mean m towards the removed images, reversed.  Weights are normalised in log space, so
    removing every near point moves the mean to the next ones instead of dividing by 0."""
    pts = points.flatten(1).double()
    logits = -torch.cdist(x.flatten(1).double(), pts) ** 2 / (2 * bandwidth**2)  # [M, N]
    mean_all = torch.softmax(logits, dim=1) @ pts  # [M, d]
    kept = torch.softmax(logits[None].masked_fill(removed[:, None], -torch.inf), dim=2)  # [R, M, N]
    return kept @ pts - mean_all[None]


def datamodel_predictions(scores: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The additive datamodel's predicted output [M, J] for each of J subsets (``removed``
    bool [J, N]) from per-image scores [M, N] (higher: the image supports the query more):
    the sum of the removed images' scores, so removing supporting images predicts a larger
    loss and a longer move.  Up to the constant sum over all N (which a rank correlation
    over subsets ignores) it is minus the sum over the kept images, the field's form."""
    return scores.double() @ removed.double().T


def variance_above_floor(outputs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per query, the share of an output's variance over subsets (``outputs`` [M, J]) that
    retraining noise does not explain: ``1 - var_floor / var_subsets``, with ``var_floor``
    the variance over training seeds of the full data's output (``floor`` [F, M]).  Near 1:
    the subsets' outputs differ for real; at or below 0: they are noise."""
    return 1 - floor.double().var(0) / outputs.double().var(1)
