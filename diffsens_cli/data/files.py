"""Published image data sets read from a local ``root`` in their original formats: MNIST's
IDX files, the TMNIST CSV, CelebA's JPEGs and attribute lists, and CIFAR-10's pickled
batches (through an unpickler that builds numpy arrays and nothing else).

A missing or malformed file is one ConfigError naming the path and the expected layout.
Loaders return 0..255 uint8 pixels; ``load_images`` scales them to [-1, 1]. The ``*_shape``
functions are the loaders' cheap half (values, folders, files present, headers), run
before a run directory exists; they return the native (C, H, W) of the images.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffsens_cli.data.base import ImageSet, Spec, draw
from diffsens_cli.errors import require

MNIST_LAYOUT = ("MNIST expects train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte, each gzipped (.gz) or not")
TMNIST_COLUMNS = ["names", "labels", *map(str, range(1, 785))]
CELEBA_LAYOUT = ("CelebA expects img_align_celeba/*.jpg, list_attr_celeba.txt (line 1 the count, line 2 the 40 "
                 "attribute names, then '000001.jpg -1 1 ...' rows) and list_eval_partition.txt ('000001.jpg 0' "
                 "rows: 0 train, 1 valid, 2 test)")
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
CIFAR_LAYOUT = "CIFAR-10 expects cifar-10-batches-py/ with data_batch_1..5 and test_batch (the python version)"


def _read_idx(spec: Spec, root: Path, name: str, header_only: bool = False) -> tuple[tuple[int, ...], np.ndarray]:
    """The shape and (unless ``header_only``: an empty array) the data of an IDX array of unsigned
    bytes: magic 0 0 0x08 ndim, ndim big-endian int32 sizes, then the data."""
    path = next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
    if path is None:
        raise spec.error("root", f"{root} has no {name}[.gz]; {MNIST_LAYOUT}")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read(4 + 4 * 255) if header_only else f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise spec.error("root", f"cannot read {path}: {e}") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    valid = len(raw) >= 4 + 4 * ndim and raw[:3] == b"\x00\x00\x08" and ndim >= 1
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4)) if valid else ()
    size = 4 + 4 * ndim + math.prod(shape)  # what the header says the file holds (python ints: no overflow)
    valid = valid and all(s >= 1 for s in shape) and size == (_idx_size(path) if header_only else len(raw))
    require(valid, spec.name("root"), f"{path} is not an IDX file of unsigned bytes (magic 0x0000080N, N sizes "
            f"of at least 1, then exactly their product in bytes)")
    data = np.empty(0, np.uint8) if header_only else np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return shape, data


def _idx_size(path: Path) -> int:
    """The bytes of an IDX file without reading it: its size, or a gzip's recorded
    uncompressed size (its last 4 bytes, modulo 2^32: ample for MNIST's 47 MB)."""
    if path.suffix != ".gz":
        return path.stat().st_size
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _mnist_files(spec: Spec, header_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """The checked images [N, H, W] and labels [N] of MNIST's ``split`` (empty arrays when ``header_only``)."""
    prefix = {"train": "train", "test": "t10k"}[spec.choice("split", ["train", "test"], "train")]
    root = spec.root(MNIST_LAYOUT.removeprefix("MNIST expects "), "MNIST's four IDX files (Yann LeCun's MNIST page "
                     "or any mirror, e.g. torchvision's)")
    shape, images = _read_idx(spec, root, f"{prefix}-images-idx3-ubyte", header_only)
    label_shape, labels = _read_idx(spec, root, f"{prefix}-labels-idx1-ubyte", header_only)
    require(len(shape) == 3 and len(label_shape) == 1 and shape[0] == label_shape[0], spec.name("root"),
            f"{root}: {prefix}-images has shape {shape} and {prefix}-labels {label_shape}; "
            "expected [N, H, W] images and N labels")
    return (np.empty((0, *shape[1:]), np.uint8) if header_only else images), labels


def mnist_shape(spec: Spec) -> tuple[int, int, int]:
    return (1, *_mnist_files(spec, header_only=True)[0].shape[1:])


def mnist(spec: Spec) -> ImageSet:
    """MNIST's ``split`` (train: 60000, test: 10000) from its IDX files."""
    images, labels = _mnist_files(spec, header_only=False)
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), None,
                    "mnist")


def _tmnist_file(spec: Spec) -> tuple[Path, str]:
    """The TMNIST CSV, its header checked, and the layout it should have."""
    file = spec.get("file", "TMNIST_Data.csv")
    require(isinstance(file, str), spec.name("file"), f"must be a file name, got {file!r}")
    layout = (f"TMNIST expects the Kaggle CSV {file}: header {','.join(TMNIST_COLUMNS[:4])},...,784, then one row "
              "per image")
    root = spec.root(f"{file}; {layout}", "TMNIST_Data.csv from Kaggle's 'TMNIST (Typography MNIST)' data set")
    path = root / file
    if not path.is_file():
        raise spec.error("root", f"{root} has no {file}; {layout}")
    try:
        with path.open() as f:
            header = [c.strip().strip('"') for c in f.readline().split(",")]
    except (OSError, UnicodeDecodeError) as e:
        raise spec.error("file", f"cannot read {path}: {e}") from None
    require(header == TMNIST_COLUMNS, spec.name("file"),
            f"{path} starts with columns {','.join(header[:4])}... ({len(header)} columns); {layout}")
    return path, layout


def tmnist_shape(spec: Spec) -> tuple[int, int, int]:
    _tmnist_file(spec)
    return 1, 28, 28


def tmnist(spec: Spec) -> ImageSet:
    """TMNIST from its CSV: a header row, then font name, digit and 784 pixels (28x28, 0..255) per row."""
    path, _ = _tmnist_file(spec)
    try:
        with warnings.catch_warnings():  # numpy warns of an empty file; the check below says it in one line
            warnings.simplefilter("ignore", UserWarning)
            rows = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 786), dtype=np.int64, quotechar='"',
                              ndmin=2)
    except ValueError as e:
        raise spec.error("file", f"{path} is malformed: {e}") from None
    require(len(rows) > 0 and rows[:, 1:].min() >= 0 and rows[:, 1:].max() <= 255 and rows[:, 0].min() >= 0
            and rows[:, 0].max() <= 9, spec.name("file"),
            f"{path} holds {len(rows)} rows; expected at least one, with labels in 0..9 and pixels in 0..255")
    images = torch.from_numpy(rows[:, 1:].astype(np.uint8).reshape(-1, 1, 28, 28))
    return ImageSet(images, torch.from_numpy(rows[:, 0].copy()), None, "tmnist")


def _celeba_table(spec: Spec, root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """File names, attribute names and the [N, 40] attribute values (+1 / -1) of list_attr_celeba.txt."""
    path = root / "list_attr_celeba.txt"
    if not path.is_file():
        raise spec.error("root", f"{root} has no list_attr_celeba.txt; {CELEBA_LAYOUT}")
    lines = path.read_text().splitlines()
    names = lines[1].split() if len(lines) > 1 else []
    rows = [line.split() for line in lines[2:] if line.strip()]
    try:
        values = np.array([r[1:] for r in rows if len(r) == len(names) + 1], dtype=np.int64).reshape(-1, len(names))
    except ValueError:
        values = np.zeros((0, len(names)), dtype=np.int64)
    well_formed = (names and lines[0].strip().isdigit() and int(lines[0]) == len(rows) == len(values)
                   and np.isin(values, (-1, 1)).all())
    require(bool(well_formed), spec.name("root"),
            f"{path} is malformed (expected line 1 the count, line 2 the attribute names, then one row per image: "
            "the file name and a -1 or 1 per attribute)")
    return [r[0] for r in rows], names, values


def _celeba_partition(spec: Spec, root: Path, files: list[str]) -> np.ndarray:
    """The partition (0 train, 1 valid, 2 test) of each file, from list_eval_partition.txt."""
    path = root / "list_eval_partition.txt"
    if not path.is_file():
        raise spec.error("root", f"{root} has no list_eval_partition.txt; {CELEBA_LAYOUT}")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    require(all(len(r) == 2 and r[1] in ("0", "1", "2") for r in rows), spec.name("root"),
            f"{path} is malformed (expected one '<file> 0|1|2' row per image)")
    partition = {name: int(code) for name, code in rows}
    missing = next((f for f in files if f not in partition), None)
    require(missing is None, spec.name("root"), f"{path} has no row for {missing} (listed in list_attr_celeba.txt)")
    return np.array([partition[f] for f in files], dtype=np.int64)


def _celeba_settings(spec: Spec) -> tuple[str, int, Path]:
    """The split, the crop and the root of a CelebA config, the root holding the files it needs."""
    split = spec.choice("split", ["train", "valid", "test", "all"], "train")
    crop = spec.positive_int("crop", 140, optional=False)
    root = spec.root(CELEBA_LAYOUT.removeprefix("CelebA expects "), "CelebA's aligned and cropped images "
                     "(img_align_celeba.zip) and its Anno and Eval text files from the CelebA project page")
    needs = ["img_align_celeba", "list_attr_celeba.txt"] + (["list_eval_partition.txt"] if split != "all" else [])
    missing = next((name for name in needs if not (root / name).exists()), None)
    if missing is not None:
        raise spec.error("root", f"{root} has no {missing}; {CELEBA_LAYOUT}")
    return split, crop, root


def celeba_shape(spec: Spec) -> tuple[int, int, int]:
    _, crop, _ = _celeba_settings(spec)
    return 3, crop, crop


def celeba(spec: Spec) -> ImageSet:
    """CelebA's ``split``, each image centre-cropped to ``crop`` and resized to ``image_size``; with
    ``limit`` only the drawn images are decoded."""
    split, crop, root = _celeba_settings(spec)
    size = spec.positive_int("image_size") or crop
    files, names, values = _celeba_table(spec, root)
    rows = np.arange(len(files))
    if split != "all":
        rows = rows[_celeba_partition(spec, root, files) == CELEBA_SPLITS[split]]
    require(len(rows) > 0, spec.name("split"), f"{root} lists no image in split {split}")
    chosen = draw(len(rows), spec.positive_int("limit"), spec.seed())
    if chosen is not None:
        rows = rows[chosen.numpy()]
    pixels = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        path = root / "img_align_celeba" / files[row]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise spec.error("root", f"cannot read {path}: {e}; {CELEBA_LAYOUT}") from None
        require(min(rgb.size) >= crop, spec.name("crop"), f"{crop} is larger than {path} ({rgb.width}x{rgb.height})")
        left, top = (rgb.width - crop) // 2, (rgb.height - crop) // 2
        pixels[i] = np.asarray(rgb.crop((left, top, left + crop, top + crop)).resize((size, size),
                                                                                   Image.Resampling.BILINEAR))
    attributes = {name: torch.from_numpy(values[rows, j] == 1) for j, name in enumerate(names)}
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), None, attributes, "celeba")


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-rebuilding function, whichever module holds it


def _latin1_bytes(text: object, encoding: object) -> bytes:
    """``_codecs.encode`` as Python 3 uses it to write bytes at protocol 2 (``encode(text, 'latin1')``),
    and nothing else: a str and the latin-1 codec make bytes, and no code runs."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it asks for _codecs.encode of {type(text).__name__} with {encoding!r}, "
                                     "which is refused (only latin-1 text to bytes)")
    return text.encode("latin-1")


def _array_from_buffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """numpy's ``_frombuffer`` (how arrays are pickled at protocol 5): bytes to an array of
    a plain dtype; ``np.frombuffer`` refuses object dtypes, so only numbers come back."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


_PICKLE_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,  # bytes as Python 3 writes them at protocol 2
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,  # arrays at protocol 5 (numpy 1.x)
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,  # arrays at protocol 5 (numpy >= 2)
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # as written by the original (numpy 1.x) files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # as numpy >= 2 writes them
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers, bytes and numpy arrays; any other class or function is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is refused (only numpy arrays load)")
        return _PICKLE_ALLOWED[module, name]


def _cifar_paths(spec: Spec) -> list[Path]:
    """The batch files of CIFAR-10's ``split`` (train: data_batch_1..5, test: test_batch), each
    present and starting as a pickle (protocol 2 or later) does."""
    split = spec.choice("split", ["train", "test"], "train")
    root = spec.root(CIFAR_LAYOUT.removeprefix("CIFAR-10 expects "), "the CIFAR-10 python version "
                     "(cifar-10-python.tar.gz) from Alex Krizhevsky's CIFAR page")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [root / "cifar-10-batches-py" / name for name in names]
    for path in paths:
        if not path.is_file():
            raise spec.error("root", f"{root} has no cifar-10-batches-py/{path.name}; {CIFAR_LAYOUT}")
        with path.open("rb") as f:
            require(f.read(1) == pickle.PROTO, spec.name("root"), f"{path} is not a CIFAR-10 batch: not a pickle")
    return paths


def cifar10_shape(spec: Spec) -> tuple[int, int, int]:
    _cifar_paths(spec)
    return 3, 32, 32


def _cifar_batch(spec: Spec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 [N, 3072] pixels and N labels of one pickled CIFAR-10 batch."""
    try:
        with path.open("rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except Exception as e:  # a malformed pickle can raise nearly anything; all mean "not a batch"
        raise spec.error("root", f"{path} is not a CIFAR-10 batch: {e}") from None
    if isinstance(batch, dict):  # bytes keys as published; str keys once re-saved after loading with latin1
        batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get("labels", []) if isinstance(batch, dict) else [])
    require(isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and labels.shape == (len(data),), spec.name("root"),
            f"{path} is not a CIFAR-10 batch: expected a dict with b'data' (uint8 [N, 3072]) and b'labels' (N ints)")
    return data, labels.astype(np.int64)


def cifar10(spec: Spec) -> ImageSet:
    """CIFAR-10's ``split`` (train: data_batch_1..5, test: test_batch), 32x32 RGB."""
    data, labels = zip(*(_cifar_batch(spec, path) for path in _cifar_paths(spec)))
    images = torch.from_numpy(np.concatenate(data)).reshape(-1, 3, 32, 32)
    return ImageSet(images, torch.from_numpy(np.concatenate(labels)), None, "cifar10")
