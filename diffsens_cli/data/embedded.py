"""Image sets built from installed packages, so that runs and tests need no download:
scikit-learn's handwritten digits (the MNIST stand-in), digits typeset in matplotlib's
fonts (the TMNIST stand-in) and scikit-image's LFW faces (the CelebA stand-in)."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

from diffsens_cli.data.base import ImageSet, Spec
from diffsens_cli.errors import require

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits(spec: Spec) -> ImageSet:
    """scikit-learn's 1797 handwritten digits: 8x8, values 0..16 (ink high) mapped to [-1, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).to(torch.float32).unsqueeze(1) / 8.0 - 1.0
    return ImageSet(images, torch.from_numpy(data.target).to(torch.int64), None, "digits")


FACE_CENTRE = slice(6, 19)  # rows and columns of the central 13x13 of the 25x25 frame: eyes, nose and mouth
FACE_ATTRIBUTES = ("Bright", "Dark", "High_Contrast", "Lit_From_Left")


def _quarters(statistic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks of the ``len // 4`` smallest and the ``len // 4`` largest values of ``statistic``,
    from one stable ranking (ties go by position), so both have exactly that count and never overlap."""
    order = np.argsort(statistic, kind="stable")
    q = len(statistic) // 4
    bottom, top = np.zeros(len(statistic), dtype=bool), np.zeros(len(statistic), dtype=bool)
    bottom[order[:q]] = True
    top[order[len(order) - q:]] = True
    return bottom, top


def face_attributes(faces: np.ndarray) -> dict[str, torch.Tensor]:
    """Attribute-like labels of faces [N, 25, 25] in [0, 1] (the native LFW subset), each a bool
    tensor [N] true for exactly ``N // 4`` faces: the top (or, for Dark, bottom) quarter of a pixel
    statistic, ranked stably (ties by position), so deterministic.

    These are stand-ins computed from pixels, not human labels: they give the embedded faces
    splits to select perturbation sets S by (``perturbation.attributes: "Bright"``), as CelebA's
    attributes (Bald, Goatee, Smiling, Eyeglasses in the paper's App. E) do.

    - ``Bright``: highest mean intensity of the central 13x13 (rows and columns 6..18: eyes, nose,
      mouth, mostly skin), so lighting and skin tone rather than background.
    - ``Dark``: lowest mean of the same region; disjoint from Bright.
    - ``High_Contrast``: highest standard deviation of all 625 pixels.
    - ``Lit_From_Left``: highest mean of the left 12 columns minus that of the right 12 (the middle
      column left out), left as the image is displayed: light from the viewer's left.
    """
    faces = np.asarray(faces, dtype=np.float64)
    if faces.ndim != 3 or faces.shape[1:] != (25, 25):
        raise ValueError(f"expected native LFW faces [N, 25, 25], got shape {faces.shape}")
    centre = faces[:, FACE_CENTRE, FACE_CENTRE].mean(axis=(1, 2))
    dark, bright = _quarters(centre)
    _, contrast = _quarters(faces.std(axis=(1, 2)))
    _, left_lit = _quarters(faces[:, :, :12].mean(axis=(1, 2)) - faces[:, :, 13:].mean(axis=(1, 2)))
    masks = dict(zip(FACE_ATTRIBUTES, (bright, dark, contrast, left_lit)))
    return {name: torch.from_numpy(mask) for name, mask in masks.items()}


def lfw_faces(spec: Spec) -> ImageSet:
    """The faces of scikit-image's LFW subset: its first 100 images (the other 100 are background crops),
    with the pixel-statistic attributes of ``face_attributes`` (Bright, Dark, High_Contrast, Lit_From_Left;
    25 faces each), computed on the native 25x25 images before any ``limit`` draw or resizing."""
    from skimage.data import lfw_subset

    native = np.asarray(lfw_subset()[:100])
    faces = torch.from_numpy(native.astype(np.float32))
    return ImageSet(faces.unsqueeze(1) * 2.0 - 1.0, None, face_attributes(native), "lfw_faces")


def _has_digit_glyphs(path: Path) -> bool:
    """Whether characters '0'..'9' map to glyphs named as digits (symbol fonts map them to other shapes)."""
    font = FT2Font(str(path))
    charmap = font.get_charmap()
    for d, word in enumerate(DIGIT_NAMES):
        glyph = charmap.get(ord("0") + d)
        if glyph is None:
            return False
        name = font.get_glyph_name(glyph)
        if not (name.startswith(word) or name == f"uni{ord('0') + d:04X}"):
            return False
    return True


@cache
def digit_fonts() -> tuple[Path, ...]:
    """matplotlib's TrueType fonts that have the ten digit glyphs, sorted by file name."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return tuple(p for p in sorted(folder.glob("*.ttf")) if _has_digit_glyphs(p))


@cache
def glyph_templates(side: int) -> torch.Tensor:
    """[fonts, 10, side, side] ink in [0, 1]: each digit of each font, its longer side filling
    the frame, centred on its bounding box (drawn at 4x and box-filtered down)."""
    fonts = digit_fonts()
    out = np.zeros((len(fonts), 10, side, side), dtype=np.float32)
    for i, path in enumerate(fonts):
        font = ImageFont.truetype(str(path), size=4 * side)
        for d in range(10):
            canvas = Image.new("L", (8 * side, 8 * side), 0)
            ImageDraw.Draw(canvas).text((4 * side, 4 * side), str(d), fill=255, font=font, anchor="mm")
            glyph = canvas.crop(canvas.getbbox())
            fit = side / max(glyph.size)
            glyph = glyph.resize((max(1, round(glyph.width * fit)), max(1, round(glyph.height * fit))),
                                 Image.Resampling.BOX)
            top, left = (side - glyph.height) // 2, (side - glyph.width) // 2
            out[i, d, top:top + glyph.height, left:left + glyph.width] = np.asarray(glyph, dtype=np.float32) / 255
    return torch.from_numpy(out)


def _typography_settings(spec: Spec) -> tuple[int, int, float]:
    """The checked number of images, side and glyph size of a typography config."""
    n = spec.positive_int("num_images", 2000, optional=False)
    size = spec.positive_int("image_size") or 8  # null: 8, to pair with scikit-learn's digits
    glyph_size = spec.get("glyph_size", 0.9)
    ok = isinstance(glyph_size, (int, float)) and not isinstance(glyph_size, bool) and 0 < glyph_size <= 1
    require(ok, spec.name("glyph_size"),
            f"must be in (0, 1] (the glyph's longer side over the frame's), got {glyph_size!r}")
    return n, size, glyph_size


def typography_shape(spec: Spec) -> tuple[int, int, int]:
    _, size, _ = _typography_settings(spec)
    return 1, size, size


def typography(spec: Spec) -> ImageSet:
    """``num_images`` digits (classes balanced) in random fonts, their longer side ``glyph_size``
    of the frame give or take 10%, shifted by up to 5% of the frame without leaving it; warped
    at high resolution and area-downsampled to ``image_size``. Deterministic given seed."""
    n, size, glyph_size = _typography_settings(spec)
    factor = max(2, math.ceil(64 / size))  # render at >= 64 pixels a side, then average factor x factor blocks
    templates = glyph_templates(size * factor)
    gen = torch.Generator().manual_seed(spec.seed())
    labels = torch.randperm(n, generator=gen) % 10
    font = torch.randint(templates.shape[0], (n,), generator=gen)
    scale = (glyph_size * (0.9 + 0.2 * torch.rand(n, generator=gen, dtype=torch.float32))).clamp(max=1.0)
    # in grid units (2 a frame)
    shift = (2 * torch.rand(n, 2, generator=gen, dtype=torch.float32) - 1) * (1 - scale).clamp(max=0.1)[:, None]
    theta = torch.zeros(n, 2, 3, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    hi = templates[font, labels].unsqueeze(1)
    grid = F.affine_grid(theta, list(hi.shape), align_corners=False)
    warped = F.grid_sample(hi, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ImageSet(F.avg_pool2d(warped, factor) * 2.0 - 1.0, labels, None, "typography")
