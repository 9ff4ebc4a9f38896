"""What a training mode draws its batches from (paper Sec. 4.3): rho (base model),
``(1 - eta_bar) rho + eta_bar S`` (retraining) or S (fine-tuning), as empirical measures
of the loaded images, with the number of items one epoch passes over."""

from __future__ import annotations

from typing import Protocol

import torch
from omegaconf import DictConfig

from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.data import ImageSet, load_images, perturbation_set
from diffsens_cli.errors import require


def training_measure(mode: str, rho: ImageSet, s: ImageSet | None, eta_bar: float) -> tuple[GaussianMixture, int]:
    """What ``mode`` trains on, as an empirical measure, and the number of items one epoch
    passes over: rho (base), ``(1 - eta_bar) rho + eta_bar S`` (retrain) or S (finetune)."""
    source = GaussianMixture.empirical(rho.images)
    if mode == "base":
        return source, len(rho)
    require(s.images.shape[1:] == rho.images.shape[1:], "perturbation.source",
            f"S has images of shape {tuple(s.images.shape[1:])}, rho {tuple(rho.images.shape[1:])}")
    s_measure = GaussianMixture.empirical(s.images)
    if mode == "retrain":
        return source.mix(s_measure, eta_bar), len(rho)
    return s_measure, len(s)


def training_source(cfg: DictConfig) -> tuple[GaussianMixture, tuple[int, ...], int, dict[str, int]]:
    """What the mode trains on (loaded from the config): the measure, the image shape, the
    number of items an epoch passes over, and the sizes of rho and S."""
    mode = cfg.train.mode
    rho = load_images(cfg.dataset)
    s = perturbation_set(cfg.perturbation, rho, cfg.dataset) if mode != "base" else None
    source, epoch = training_measure(mode, rho, s, float(cfg.train.eta_bar))
    sizes = {"rho": len(rho)} | ({"S": len(s)} if s is not None else {})
    return source, tuple(rho.images.shape[1:]), epoch, sizes


class BatchSource(Protocol):
    """What the training loop draws its batches from: a ``GaussianMixture`` or ``SharedDraws``."""

    def to(self, device: torch.device | str, dtype: torch.dtype) -> BatchSource: ...

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training items, flattened: [n, d]."""
        ...


class SharedDraws:
    """The uniform empirical measure on the kept rows of ``points`` [N, ...], sampled so
    that trainings on different kept sets see the same batches wherever they can: each
    item is a position drawn uniformly among all N (the same draw for every kept set, from
    the same generator), redrawn among the kept positions when its image was removed.
    Removing k of N images then changes about k/N of the batch items, not every batch, so
    a counterfactual retraining differs from the full-data one by the removal rather than
    by a new sequence of batches (measured on the digits: a new training seed alone moves
    model samples by 6-33%)."""

    def __init__(self, points: torch.Tensor, keep: torch.Tensor):
        if keep.dtype != torch.bool or keep.shape != points.shape[:1] or not bool(keep.any()):
            raise ValueError("keep must be a non-empty bool mask over the points")
        self.points, self.keep = points.flatten(1), keep
        self.kept = torch.nonzero(keep).flatten()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> SharedDraws:
        return SharedDraws(self.points.to(device, dtype), self.keep.to(device))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` kept points; both draws are made for every item, so the generator's
        stream after them is the same for every kept set."""
        device = self.points.device
        first = torch.randint(len(self.points), (n,), generator=generator, device=device)
        second = self.kept[torch.randint(len(self.kept), (n,), generator=generator, device=device)]
        return self.points[torch.where(self.keep[first], first, second)]
