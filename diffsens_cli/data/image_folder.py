"""``dataset=image_folder``: a folder of images in any format Pillow reads, flat or in
class subfolders (torchvision's ImageFolder layout: the subfolder names, sorted, are the
labels 0..K-1), each image's path relative to the folder kept as its name so that
results can name the images.

With ``image_size`` every image is resized so that its shorter side is ``image_size``
and centre-cropped to a square, as diffusers' training examples do (``Resize`` then
``CenterCrop``); without it every image must have the first one's size. ``channels``
(1 or 3) converts every image to grayscale or RGB (alpha is dropped); null keeps the
first image's count and refuses an image with another. With ``limit`` only the drawn
images are decoded. Hidden files and folders (a leading dot) are skipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffsens_cli.data.base import ImageSet, Spec, draw
from diffsens_cli.errors import require
from diffsens_cli.stages import file_stamp

LAYOUT = "image files, flat or one subfolder per class"
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # Pillow's modes of one colour channel (and alpha)


def _extensions() -> set[str]:
    """The file suffixes Pillow can open (lower case)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _root(spec: Spec) -> Path:
    root = spec.get("root")
    require(root is not None, spec.name("root"), f"is null; set it to a folder of {LAYOUT}")
    path = Path(str(root)).expanduser()
    require(path.is_dir(), spec.name("root"), f"{path} is not a folder; expected one of {LAYOUT}")
    return path


def listing(spec: Spec) -> tuple[Path, list[str], list[int] | None]:
    """The folder, its images' relative names (sorted; by class, then name, with class
    subfolders) and their labels (None for a flat folder)."""
    root = _root(spec)
    images = _extensions()

    def pictures(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix.lower() in images
                      and all(_visible(part) for part in p.relative_to(root).parts))

    flat = pictures(root, recursive=False)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    classes = [(folder, found) for folder in folders if (found := pictures(folder, recursive=True))]
    if flat and classes:
        raise spec.error("root", f"{root} holds both images ({flat[0].name}) and class subfolders "
                         f"({classes[0][0].name}); use one layout")
    if not classes:
        require(bool(flat), spec.name("root"),
                f"{root} holds no images Pillow reads; expected {LAYOUT} (suffixes such as .png, .jpg)")
        return root, [p.name for p in flat], None
    names = [p.relative_to(root).as_posix() for _, found in classes for p in found]
    labels = [label for label, (_, found) in enumerate(classes) for _ in found]
    return root, names, labels


def _open(spec: Spec, root: Path, name: str) -> Image.Image:
    try:
        with Image.open(root / name) as img:
            img.load()
            return img
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise spec.error("root", f"cannot read {root / name}: {e}") from None


def _channels(img: Image.Image) -> int:
    return 1 if img.mode in GRAY_MODES else 3


def _settings(spec: Spec) -> tuple[int | None, int | None]:
    channels = spec.get("channels")
    require(channels in (None, 1, 3), spec.name("channels"), f"must be null (as stored), 1 or 3, got {channels!r}")
    return channels, spec.positive_int("image_size")


def image_folder_shape(spec: Spec) -> tuple[int, int, int]:
    """The settings, the listing and the first image's header: the (C, H, W) of the images
    (H = W = ``image_size`` when it is set)."""
    channels, size = _settings(spec)
    root, names, _ = listing(spec)
    try:
        with Image.open(root / names[0]) as first:  # the header only
            width, height, stored = first.width, first.height, _channels(first)
    except (OSError, UnidentifiedImageError) as e:
        raise spec.error("root", f"cannot read {root / names[0]}: {e}") from None
    channels = channels or stored
    return (channels, size, size) if size else (channels, height, width)


def _resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear, antialiased), then the centred square: torchvision's
    ``Resize(size)`` and ``CenterCrop(size)`` as diffusers' training examples use them."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new = (size, new_long) if width <= height else (new_long, size)
    if new != img.size:
        img = img.resize(new, Image.Resampling.BILINEAR)
    left, top = int(round((img.width - size) / 2.0)), int(round((img.height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def fingerprint(spec: Spec) -> dict[str, Any]:
    """What the decoded images depend on, read from the file system without opening an
    image: the folder, each file's name, size and modification time (the quick check of
    make and rsync: a file rewritten in place with the same size within the file system's
    time resolution goes unseen), and the settings. The key of the decoded-images stage."""
    root, names, _ = listing(spec)
    files = hashlib.sha256()
    for name in names:
        size, mtime_ns = file_stamp(root / name)
        files.update(f"{name}\0{size}\0{mtime_ns}\n".encode())
    return {"root": str(root.resolve()), "files": files.hexdigest(), "count": len(names),
            **{k: spec.get(k) for k in ("channels", "image_size", "limit", "seed")}}


def image_folder(spec: Spec) -> ImageSet:
    """The folder's images (the ``limit`` drawn with ``seed``, only those decoded) as 0..255
    uint8 [N, C, H, W], with their labels and relative names."""
    channels, size = _settings(spec)
    root, names, labels = listing(spec)
    rows = np.arange(len(names))
    chosen = draw(len(names), spec.positive_int("limit"), spec.seed())
    if chosen is not None:
        rows = rows[chosen.numpy()]
    first_name, first = names[rows[0]], _open(spec, root, names[rows[0]])
    channels = channels or _channels(first)
    mode = "L" if channels == 1 else "RGB"
    pixels: list[np.ndarray] = []
    for row in rows:
        img = first if row == rows[0] else _open(spec, root, names[row])
        if spec.get("channels") is None and _channels(img) != channels:
            raise spec.error("channels", f"{names[row]} has {_channels(img)} channel(s) ({img.mode}), the first "
                             f"image {first_name} {channels} ({first.mode}): set channels to 1 or 3 to convert all")
        img = img.convert(mode)
        if size:
            img = _resize_and_crop(img, size)
        elif img.size != first.size:
            raise spec.error("image_size", f"{names[row]} is {img.width}x{img.height}, the first image "
                             f"{first_name} {first.width}x{first.height}: set image_size to resize every image "
                             "(shorter side, then a centre crop)")
        array = np.asarray(img, dtype=np.uint8)
        pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return ImageSet(images=torch.from_numpy(np.stack(pixels)), name="image_folder", attributes=None,
                    labels=None if labels is None else torch.tensor([labels[r] for r in rows], dtype=torch.int64),
                    names=[names[r] for r in rows])
