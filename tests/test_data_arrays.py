"""``dataset=arrays``: images from a NumPy file a user brings, round-tripped exactly to
[-1, 1] in every layout, with labels, resizing and the seeded limit, and every bad file
or setting stopped in one line before anything is loaded where the header tells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffsens_cli.data import check_images, load_images
from diffsens_cli.errors import ConfigError

RNG = np.random.default_rng(0)
NCHW = RNG.integers(0, 256, size=(6, 3, 5, 7), dtype=np.uint8)  # H=5, W=7: no axis but C is a channel count


def arrays(root: Path, **kw) -> dict:
    return {"kind": "arrays", "root": str(root), "image_size": None, "limit": None, "seed": 0, **kw}


def error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_images(cfg)
    return str(e.value)


def expected(nchw: np.ndarray, low: float = 0, high: float = 255) -> torch.Tensor:
    return ((torch.from_numpy(nchw).double() - low) / (high - low) * 2 - 1).float()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_both_layouts_round_trip_with_labels(tmp_path, layout):
    images = NCHW if layout == "nchw" else NCHW.transpose(0, 2, 3, 1)
    labels = np.arange(6) % 2
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    cfg = arrays(tmp_path / "set.npz")
    assert check_images(cfg) == (3, 5, 7)
    out = load_images(cfg)
    torch.testing.assert_close(out.images, expected(NCHW), rtol=0, atol=1e-6)
    assert out.images.min() >= -1 and out.images.max() <= 1
    assert out.labels.tolist() == labels.tolist() and out.labels.dtype == torch.int64


def test_one_channel_floats_in_their_range_resized_and_limited(tmp_path):
    gray = RNG.uniform(0, 1, size=(10, 6, 6))
    np.save(tmp_path / "gray.npy", gray)
    cfg = arrays(tmp_path / "gray.npy", value_range=[0, 1])
    assert check_images(cfg) == (1, 6, 6)
    out = load_images(cfg)
    torch.testing.assert_close(out.images, expected(gray[:, None], 0, 1), rtol=0, atol=1e-6)
    assert out.labels is None
    small = load_images(arrays(tmp_path / "gray.npy", value_range=[0, 1], image_size=3, limit=4, seed=1))
    assert small.images.shape == (4, 1, 3, 3)
    picked = torch.randperm(10, generator=torch.Generator().manual_seed(1))[:4].sort().values
    big = load_images(arrays(tmp_path / "gray.npy", value_range=[0, 1], image_size=3))
    torch.testing.assert_close(small.images, big.images[picked])


def test_an_explicit_layout_settles_an_ambiguous_shape(tmp_path):
    square = RNG.integers(0, 256, size=(2, 3, 4, 3), dtype=np.uint8)  # axis 1 and axis 3 could be channels
    np.save(tmp_path / "amb.npy", square)
    assert "dataset.layout: cannot tell the channel axis of shape [2, 3, 4, 3]: set nchw or nhwc" in \
        error(arrays(tmp_path / "amb.npy"))
    out = load_images(arrays(tmp_path / "amb.npy", layout="nhwc"))
    torch.testing.assert_close(out.images, expected(square.transpose(0, 3, 1, 2)), rtol=0, atol=1e-6)


def test_bad_files_and_settings_are_one_line(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "nolabels.npz", pixels=NCHW)
    np.savez(tmp_path / "badlabels.npz", images=NCHW, labels=np.arange(5))
    np.save(tmp_path / "flat.npy", np.zeros((4, 16), dtype=np.uint8))
    np.save(tmp_path / "range.npy", np.full((2, 4, 4), 300.0))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "x.png").write_bytes(b"")
    cases = {
        "missing.npz": "dataset.root: {p}/missing.npz is not a file",
        "x.png": "dataset.root: {p}/x.png is neither .npy nor .npz",
        "obj.npy": "dataset.root: {p}/obj.npy: images must be numbers, got dtype object",
        "nolabels.npz": "dataset.root: {p}/nolabels.npz has no 'images' array (it holds pixels)",
        "badlabels.npz": "dataset.root: {p}/badlabels.npz: 'labels' must be 6 integers (one per image)",
        "flat.npy": "dataset.root: images must be [N, H, W], [N, C, H, W] or [N, H, W, C] with N >= 1, got shape "
                    "[4, 16]",
        "range.npy": "dataset.value_range: {p}/range.npy: 32 values lie outside [0, 255]",
        "junk.npz": "dataset.root: {p}/junk.npz is not a readable NumPy file",
    }
    for name, message in cases.items():
        got = error(arrays(tmp_path / name))
        assert message.format(p=tmp_path) in got and "\n" not in got, (name, got)
    assert "dataset.value_range: must be [low, high] with low < high, got [1, 0]" in \
        error(arrays(tmp_path / "range.npy", value_range=[1, 0]))
    assert "dataset.root: is null" in error(arrays(tmp_path) | {"root": None})
