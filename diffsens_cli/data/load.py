"""``load_images``: a ``dataset`` config node to a checked ImageSet in [-1, 1]."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from diffsens_cli.data import embedded, files
from diffsens_cli.data.base import ImageSet, Spec, draw, from_uint8, resize
from diffsens_cli.errors import require

LOADERS = {
    "digits": embedded.digits,
    "typography": embedded.typography,
    "lfw_faces": embedded.lfw_faces,
    "mnist": files.mnist,
    "tmnist": files.tmnist,
    "celeba": files.celeba,
    "cifar10": files.cifar10,
}
IMAGE_DATASETS: tuple[str, ...] = tuple(LOADERS)
EMBEDDED = ("digits", "typography", "lfw_faces")


def load_images(cfg: DictConfig | dict, key: str = "dataset") -> ImageSet:
    """The images of a data-set config: ``limit`` of them drawn with ``seed``, resized to
    ``image_size``, float32 in [-1, 1]. Errors name ``<key>.<field>``."""
    spec = Spec(cfg, key)
    kind = spec.choice("kind", list(IMAGE_DATASETS), None)
    size, limit = spec.positive_int("image_size"), spec.positive_int("limit")
    require(kind not in EMBEDDED or spec.get("root") is None, spec.name("root"),
            f"must be null: {kind} is embedded (built from installed packages), got {spec.get('root')!r}")
    images = LOADERS[kind](spec)
    chosen = draw(len(images), limit, spec.seed())
    if chosen is not None:
        images = images.subset(chosen)
    pixels = from_uint8(images.images) if images.images.dtype == torch.uint8 else images.images
    images.images = resize(pixels, size)
    return images
