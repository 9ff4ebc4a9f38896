"""``load_images``: a ``dataset`` config node to a checked ImageSet in [-1, 1]."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.data import arrays, embedded, files, image_folder
from diffsens_cli.data.base import ImageSet, Spec, draw, from_uint8, resize
from diffsens_cli.errors import plain, require
from diffsens_cli.stages import file_stamp

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
    "image_folder": image_folder.image_folder_shape,
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
    "image_folder": image_folder.image_folder,
}
IMAGE_DATASETS: tuple[str, ...] = tuple(LOADERS)
# Sets decoded from many image files, worth keeping decoded: their stage keys.
DECODED_ONCE = {"image_folder": image_folder.fingerprint}
# Sets read from the user's own files, which may change in place under the same config:
# what of their files a stage depends on (names, sizes, modification times).
USER_FILES = {"image_folder": image_folder.fingerprint, "arrays": arrays.fingerprint}
# A stage cache's ``arrays(name, depends, compute)``: the data layer asks for one, knowing no more.
Memo = Callable[[str, dict[str, Any], Callable[[], dict[str, np.ndarray]]], dict[str, np.ndarray]]
EMBEDDED = ("digits", "typography", "lfw_faces")


def _common(spec: Spec) -> tuple[str, int | None, int | None, int]:
    """The checked kind, image_size, limit and seed every data-set config has."""
    kind = spec.choice("kind", list(IMAGE_DATASETS), None)
    size, limit = spec.positive_int("image_size"), spec.positive_int("limit")
    require(kind not in EMBEDDED or spec.get("root") is None, spec.name("root"),
            f"must be null: {kind} is embedded (built from installed packages), got {spec.get('root')!r}")
    return kind, size, limit, spec.seed()


def data_depends(cfg: DictConfig | dict, key: str = "dataset") -> Any:
    """A data-set node (or one holding some: a perturbation and its ``source``) as a stage
    depends on it: its settings, with the fingerprint of every data set read from the
    user's own files (``USER_FILES``) and of a ``scores_file``, so that no stage outlives
    a change to them."""
    node = plain(cfg)

    def stamped(value: Any, name: str) -> Any:
        if not isinstance(value, dict):
            return value
        out = {k: stamped(v, f"{name}.{k}") for k, v in value.items()}
        if value.get("kind") in USER_FILES:
            out["files"] = USER_FILES[value["kind"]](Spec(value, name))
        if value.get("scores_file"):
            path = Path(str(value["scores_file"])).expanduser()
            out["scores_file_stamp"] = list(file_stamp(path)) if path.is_file() else None
        return out

    return stamped(node, key)


def check_images(cfg: DictConfig | dict, key: str = "dataset") -> tuple[int, int, int]:
    """Check a data-set config without loading its images (values, the root folder, the files
    the loader reads and their headers); the (C, H, W) its images will have."""
    spec = Spec(cfg, key)
    kind, size, _, _ = _common(spec)
    channels, height, width = SHAPES[kind](spec)
    return (channels, size, size) if size else (channels, height, width)


def load_images(cfg: DictConfig | dict, key: str = "dataset", cache: Memo | None = None) -> ImageSet:
    """The images of a data-set config: ``limit`` of them drawn with ``seed``, resized to
    ``image_size``, float32 in [-1, 1]. Errors name ``<key>.<field>``. With ``cache`` (a
    stage cache's ``arrays``), a folder of image files is decoded once, into the stage
    ``decoded_images`` keyed by its files' names, sizes and times, and read from there after."""
    spec = Spec(cfg, key)
    kind, size, limit, seed = _common(spec)
    once = kind in DECODED_ONCE and cache is not None
    images = _decoded_once(spec, kind, cache) if once else LOADERS[kind](spec)
    chosen = draw(len(images), limit, seed)
    if chosen is not None:
        images = images.subset(chosen)
    pixels = from_uint8(images.images) if images.images.dtype == torch.uint8 else images.images
    images.images = resize(pixels, size)
    return images


def _decoded_once(spec: Spec, kind: str, cache: Memo) -> ImageSet:
    """The loader's result through the stage cache (pixels, labels and names as arrays)."""

    def decode() -> dict[str, np.ndarray]:
        images = LOADERS[kind](spec)
        out = {"images": images.images.numpy(), "names": np.array(images.names, dtype=str)}
        return out | ({} if images.labels is None else {"labels": images.labels.numpy()})

    arrays = cache("decoded_images", {"kind": kind, **DECODED_ONCE[kind](spec)}, decode)
    labels = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
    return ImageSet(torch.from_numpy(arrays["images"]), labels, None, kind, names=arrays["names"].tolist())
