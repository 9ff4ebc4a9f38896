"""What a training mode draws its batches from (paper Sec. 4.3): rho (base model),
``(1 - eta_bar) rho + eta_bar S`` (retraining) or S (fine-tuning), as empirical measures
of the loaded images, with the number of items one epoch passes over."""

from __future__ import annotations

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
