"""``load_images``: a ``dataset`` config node to a checked ImageSet in [-1, 1]."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from diffsens_cli.data import arrays, embedded, files
from diffsens_cli.data.base import ImageSet, Spec, draw, from_uint8, resize
from diffsens_cli.errors import require

# The loaders' cheap checks (values, folders, file headers): the native (C, H, W) of the images.
SHAPES = {
    "digits": lambda spec: (1, 8, 8),
    "typography": embedded.typography_shape,
    "lfw_faces": lambda spec: (1, 25, 25),
    "mnist": files.mnist_shape,
    "tmnist": files.tmnist_shape,
    "celeba": files.celeba_shape,
    "cifar10": files.cifar10_shape,
    "arrays": arrays.arrays_shape,
}
LOADERS = {
    "digits": embedded.digits,
    "typography": embedded.typography,
    "lfw_faces": embedded.lfw_faces,
    "mnist": files.mnist,
    "tmnist": files.tmnist,
    "celeba": files.celeba,
    "cifar10": files.cifar10,
    "arrays": arrays.arrays,
}
IMAGE_DATASETS: tuple[str, ...] = tuple(LOADERS)
EMBEDDED = ("digits", "typography", "lfw_faces")


def _common(spec: Spec) -> tuple[str, int | None, int | None, int]:
    """The checked kind, image_size, limit and seed every data-set config has."""
    kind = spec.choice("kind", list(IMAGE_DATASETS), None)
    size, limit = spec.positive_int("image_size"), spec.positive_int("limit")
    require(kind not in EMBEDDED or spec.get("root") is None, spec.name("root"),
            f"must be null: {kind} is embedded (built from installed packages), got {spec.get('root')!r}")
    return kind, size, limit, spec.seed()


def check_images(cfg: DictConfig | dict, key: str = "dataset") -> tuple[int, int, int]:
    """Check a data-set config without loading its images (values, the root folder, the files
    the loader reads and their headers); the (C, H, W) its images will have."""
    spec = Spec(cfg, key)
    kind, size, _, _ = _common(spec)
    channels, height, width = SHAPES[kind](spec)
    return (channels, size, size) if size else (channels, height, width)


def load_images(cfg: DictConfig | dict, key: str = "dataset") -> ImageSet:
    """The images of a data-set config: ``limit`` of them drawn with ``seed``, resized to
    ``image_size``, float32 in [-1, 1]. Errors name ``<key>.<field>``."""
    spec = Spec(cfg, key)
    kind, size, limit, seed = _common(spec)
    images = LOADERS[kind](spec)
    chosen = draw(len(images), limit, seed)
    if chosen is not None:
        images = images.subset(chosen)
    pixels = from_uint8(images.images) if images.images.dtype == torch.uint8 else images.images
    images.images = resize(pixels, size)
    return images
