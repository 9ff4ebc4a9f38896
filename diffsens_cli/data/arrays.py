"""``dataset=arrays``: images a user brings as a NumPy file, an ``.npy`` array of images or
an ``.npz`` archive with ``images`` (and optionally integer ``labels``), read with
``allow_pickle=False`` so that a file can hold numbers and nothing that runs.

Images are [N, H, W] (one channel), [N, C, H, W] or [N, H, W, C] (C of 1, 3 or 4; which
one, ``layout: auto`` reads from the axis that is a channel count, or say ``nchw`` /
``nhwc``), with values in ``value_range`` (default [0, 255], as uint8 images hold;
[0, 1] or [-1, 1] for float images), which ``load_images`` maps to [-1, 1]; null takes
the values as they are (samples already on the model's scale, such as diffsens' own).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from diffsens_cli.data.base import ImageSet, Spec
from diffsens_cli.errors import number, require
from diffsens_cli.stages import file_stamp

CHANNELS = (1, 3, 4)
LAYOUT = "an .npy array of images [N, H, W], [N, C, H, W] or [N, H, W, C], or an .npz with 'images' (and 'labels')"


def _path(spec: Spec) -> Path:
    root = spec.get("root")
    require(root is not None, spec.name("root"), f"is null; set it to {LAYOUT}")
    path = Path(str(root)).expanduser()
    require(path.is_file(), spec.name("root"), f"{path} is not a file; expected {LAYOUT}")
    require(path.suffix in (".npy", ".npz"), spec.name("root"), f"{path} is neither .npy nor .npz; expected {LAYOUT}")
    return path


def fingerprint(spec: Spec) -> dict[str, Any]:
    """The array file as a stage depends on it, without reading it: its resolved path,
    size and modification time (the quick check of make and rsync)."""
    path = _path(spec)
    size, mtime_ns = file_stamp(path)
    return {"file": str(path.resolve()), "size": size, "mtime_ns": mtime_ns}


def _header(spec: Spec, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the images, from the file's header only."""
    try:
        if path.suffix == ".npy":
            with path.open("rb") as f:
                return _read_header(f)
        with zipfile.ZipFile(path) as archive:
            require("images.npy" in archive.namelist(), spec.name("root"),
                    f"{path} has no 'images' array (it holds {', '.join(_members(archive)) or 'nothing'})")
            with archive.open("images.npy") as f:
                return _read_header(f)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise spec.error("root", f"{path} is not a readable NumPy file: {e}") from None


def _members(archive: zipfile.ZipFile) -> list[str]:
    return [name.removesuffix(".npy") for name in archive.namelist()]


def _read_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """NumPy's own header reader: the array's shape and dtype, without its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def _layout(spec: Spec, shape: tuple[int, ...]) -> str:
    """``nhw``, ``nchw`` or ``nhwc``: how the images' axes are laid out."""
    require(len(shape) in (3, 4) and shape[0] >= 1, spec.name("root"),
            f"images must be [N, H, W], [N, C, H, W] or [N, H, W, C] with N >= 1, got shape {list(shape)}")
    if len(shape) == 3:
        return "nhw"
    layout = spec.choice("layout", ["auto", "nchw", "nhwc"], "auto")
    if layout == "auto":
        first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
        require(first != last, spec.name("layout"),
                f"cannot tell the channel axis of shape {list(shape)}: set nchw or nhwc")
        layout = "nchw" if first else "nhwc"
    channels = shape[1] if layout == "nchw" else shape[3]
    require(channels in CHANNELS, spec.name("layout"),
            f"{layout} gives {channels} channels for shape {list(shape)}; images have 1, 3 or 4")
    return layout


def _value_range(spec: Spec) -> tuple[float, float] | None:
    """``value_range`` as (low, high), or None: the values are on the model's scale already."""
    low_high = spec.get("value_range", [0, 255])
    if low_high is None:
        return None
    need = f"must be [low, high] with low < high, got {low_high}"
    require(isinstance(low_high, list) and len(low_high) == 2, spec.name("value_range"), need)
    low, high = (number(v, spec.name("value_range")) for v in low_high)
    require(low < high, spec.name("value_range"), need)
    return low, high


def arrays_shape(spec: Spec) -> tuple[int, int, int]:
    """The checked settings and file header: the native (C, H, W) of the images."""
    path = _path(spec)
    _value_range(spec)
    shape, dtype = _header(spec, path)
    require(dtype.kind in "uif", spec.name("root"), f"{path}: images must be numbers, got dtype {dtype}")
    layout = _layout(spec, shape)
    if layout == "nhw":
        return 1, shape[1], shape[2]
    return (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])


def arrays(spec: Spec) -> ImageSet:
    """The images [N, C, H, W] (uint8 0..255 as stored, or float32 in [-1, 1]) and labels of the file."""
    arrays_shape(spec)
    path = _path(spec)
    try:
        if path.suffix == ".npy":
            images, labels = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as archive:
                images, labels = archive["images"], archive["labels"] if "labels" in archive.files else None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise spec.error("root", f"{path} is not a readable NumPy file: {e}") from None
    layout = _layout(spec, images.shape)
    images = images[:, None] if layout == "nhw" else images.transpose(0, 3, 1, 2) if layout == "nhwc" else images
    value_range = _value_range(spec)
    if images.dtype == np.uint8 and value_range == (0, 255):  # as every loader's: load_images scales them
        pixels = torch.from_numpy(np.ascontiguousarray(images))
    else:
        low, high = value_range or (-math.inf, math.inf)
        bad = ~np.isfinite(images) | (images < low) | (images > high)
        if bad.any():
            raise spec.error("value_range", f"{path}: {int(bad.sum())} values lie outside [{low:g}, {high:g}] "
                             f"(or are not finite), e.g. {images[bad][0]:g}; set value_range to the images' range")
        pixels = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # float32: large sets fit
        if value_range is not None:
            pixels = (pixels - low) * (2 / (high - low)) - 1
    return ImageSet(images=pixels, labels=_labels(spec, path, labels, len(pixels)), attributes=None, name="arrays")


def _labels(spec: Spec, path: Path, labels: np.ndarray | None, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    require(labels.dtype.kind in "iu" and labels.shape == (n,), spec.name("root"),
            f"{path}: 'labels' must be {n} integers (one per image), got dtype {labels.dtype}, "
            f"shape {list(labels.shape)}")
    require(labels.min() >= 0, spec.name("root"), f"{path}: 'labels' must be >= 0, got {labels.min()}")
    return torch.from_numpy(labels.astype(np.int64))
