"""What the figures share: images and signed images on bare axes, canvases of image rows, thumbnails."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

SIGNED_CMAP = "RdBu_r"  # diverging: blue negative, white zero, red positive


def show_image(ax, image) -> matplotlib.image.AxesImage:
    """One image [C, H, W] in [-1, 1] (greyscale when C = 1), clipped, without ticks."""
    image = np.clip((np.asarray(image, dtype=float) + 1) / 2, 0, 1)
    im = ax.imshow(image[0], cmap="gray", vmin=0, vmax=1) if image.shape[0] == 1 else \
        ax.imshow(image.transpose(1, 2, 0))
    bare(ax)
    return im


def thumbnail(image, min_side: int = 64) -> Image.Image:
    """One image [C, H, W] in [-1, 1] as a Pillow image (greyscale when C = 1), clipped and
    enlarged by a whole factor with nearest-neighbour pixels to at least ``min_side``, so
    an 8x8 digit shows its pixels on a page."""
    pixels = np.round(np.clip((np.asarray(image, dtype=float) + 1) / 2, 0, 1) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    factor = max(1, -(-min_side // min(picture.size)))
    return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)


def show_signed(ax, values, cmap: str = SIGNED_CMAP) -> matplotlib.image.AxesImage:
    """One signed image [C, H, W] (the channel mean when C > 1) in a diverging colormap centred
    at zero, scaled symmetric by its own max |value| m (vmin=-m, vmax=m; m = 1 when all zero or
    non-finite), so that sign shows whatever the scale; m is written under it."""
    values = np.asarray(values, dtype=float)
    plane = values.mean(axis=0) if values.ndim == 3 else values
    finite = np.abs(plane[np.isfinite(plane)])
    m = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(plane, cmap=cmap, vmin=-m, vmax=m)
    bare(ax)
    ax.set_xlabel(f"±{m:.1e}", fontsize=7, labelpad=1)
    return im


def bare(ax) -> None:
    """No ticks or frame, but (unlike axis('off')) room for a y label: the row label."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def cell_inches(images) -> float:
    """Inches a grid cell: larger for larger images."""
    return 1.1 if np.asarray(images).shape[-1] <= 32 else 1.4


def rows_canvas(rows: list[list[np.ndarray]], gap_after: int) -> np.ndarray:
    """Images [C, H, W] laid out in rows on one white canvas, 1 pixel apart, with half an
    image's width of space after the first ``gap_after`` of each row."""
    c, h, w = rows[0][0].shape
    pad, gap = 1, w // 2
    width = max(len(row) for row in rows) * (w + pad) + gap
    canvas = np.ones((c, len(rows) * (h + pad), width))
    for r, row in enumerate(rows):
        y = r * (h + pad)
        for j, image in enumerate(row):
            x = j * (w + pad) + (gap if j >= gap_after else 0)
            canvas[:, y:y + h, x:x + w] = image
    return canvas


def canvas_panels(canvases: list[np.ndarray], labels: list[str], titles: list[str], columns: int) -> plt.Figure:
    """One panel per canvas of ``rows_canvas`` (``labels``: its rows), stacked."""
    fig, axes = plt.subplots(len(canvases), 1, squeeze=False,
                             figsize=(0.45 * (columns + 0.5) + 1.2, (0.45 * len(labels) + 0.4) * len(canvases)))
    for ax, canvas, title in zip(axes[:, 0], canvases, titles, strict=True):
        show_image(ax, canvas)
        h = canvas.shape[1] / len(labels)
        ax.set_yticks([(r + 0.5) * h for r in range(len(labels))], labels, fontsize=7)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
