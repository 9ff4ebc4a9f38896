"""``dataset=image_folder``: a user's folder of images, flat or by class, round-tripped
exactly to [-1, 1] with labels and file names; resizing as diffusers' training examples
do (shorter side, centre crop); only the drawn images decoded; every bad folder or image
one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from diffsens_cli.data import check_images, check_perturbation_set, load_images, perturbation_set
from diffsens_cli.errors import ConfigError
from diffsens_cli.stages import StageCache

RNG = np.random.default_rng(0)


def folder(root: Path, **kw) -> dict:
    return {"kind": "image_folder", "root": str(root), "channels": None, "image_size": None, "limit": None,
            "seed": 0, **kw}


def error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_images(cfg)
    return str(e.value)


def unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).float() / 127.5 - 1


def save(path: Path, pixels: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_class_subfolders_are_sorted_labels_with_names_in_any_lossless_format(tmp_path):
    written = {}
    for name in ["zebra/b.png", "zebra/a.bmp", "ant/x/deep.tif", "ant/c.png"]:
        written[name] = save(tmp_path / name, RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    save(tmp_path / ".hidden" / "skip.png", np.zeros((5, 7, 3), dtype=np.uint8))
    cfg = folder(tmp_path)
    assert check_images(cfg) == (3, 5, 7)
    out = load_images(cfg)
    assert out.names == ["ant/c.png", "ant/x/deep.tif", "zebra/a.bmp", "zebra/b.png"]
    assert out.labels.tolist() == [0, 0, 1, 1]
    for i, name in enumerate(out.names):
        torch.testing.assert_close(out.images[i], unit(written[name]).permute(2, 0, 1))


def test_a_flat_grayscale_folder_and_a_seeded_limit_that_decodes_only_the_drawn(tmp_path):
    gray = [save(tmp_path / f"{i:02d}.png", RNG.integers(0, 256, size=(6, 6), dtype=np.uint8)) for i in range(10)]
    full = load_images(folder(tmp_path))
    assert full.labels is None and full.images.shape == (10, 1, 6, 6) and full.names[0] == "00.png"
    torch.testing.assert_close(full.images[:, 0], unit(np.stack(gray)))
    picked = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4].sort().values.tolist()
    for i in set(range(10)) - set(picked):  # undecodable, and never opened
        (tmp_path / f"{i:02d}.png").write_bytes(b"not a png")
    some = load_images(folder(tmp_path, limit=4, seed=3))
    assert some.names == [f"{i:02d}.png" for i in picked]
    torch.testing.assert_close(some.images, full.images[picked])


def test_image_size_resizes_the_shorter_side_then_crops_the_centre(tmp_path):
    tall = save(tmp_path / "tall.png", RNG.integers(0, 256, size=(12, 8, 3), dtype=np.uint8))  # H=12, W=8
    save(tmp_path / "wide.png", RNG.integers(0, 256, size=(8, 10, 3), dtype=np.uint8))
    cfg = folder(tmp_path, image_size=4, channels=1)
    assert check_images(cfg) == (1, 4, 4)
    out = load_images(cfg)
    # By hand: 8x12 (W x H) -> 4x6, rows 1..4 kept (round((6 - 4) / 2) = 1); grayscale by Pillow's L.
    by_hand = np.asarray(Image.fromarray(tall).convert("L").resize((4, 6), Image.Resampling.BILINEAR))[1:5]
    torch.testing.assert_close(out.images[0, 0], unit(by_hand))
    assert out.images.shape == (2, 1, 4, 4)


def test_bad_folders_and_images_are_one_line(tmp_path):
    flat, mixed, sizes, colours, unreadable, empty = (tmp_path / n for n in
                                                       ("flat", "mixed", "sizes", "colours", "bad", "empty"))
    save(mixed / "top.png", np.zeros((4, 4), dtype=np.uint8))
    save(mixed / "cls" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    save(sizes / "a.png", np.zeros((4, 4), dtype=np.uint8))
    save(sizes / "b.png", np.zeros((5, 4), dtype=np.uint8))
    save(colours / "a.png", np.zeros((4, 4), dtype=np.uint8))
    save(colours / "b.png", np.zeros((4, 4, 3), dtype=np.uint8))
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"not a png")
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    cases = [
        (folder(flat), f"dataset.root: {flat} is not a folder; expected one of image files"),
        (folder(empty), f"dataset.root: {empty} holds no images Pillow reads"),
        (folder(mixed), f"dataset.root: {mixed} holds both images (top.png) and class subfolders (cls)"),
        (folder(sizes), "dataset.image_size: b.png is 4x5, the first image a.png 4x4: set image_size"),
        (folder(colours), "dataset.channels: b.png has 3 channel(s) (RGB), the first image a.png 1 (L)"),
        (folder(unreadable), f"dataset.root: cannot read {unreadable}/a.png"),
        (folder(sizes, channels=2), "dataset.channels: must be null (as stored), 1 or 3, got 2"),
        (folder(flat) | {"root": None}, "dataset.root: is null; set it to a folder of image files"),
    ]
    for cfg, message in cases:
        got = error(cfg)
        assert got.startswith(message) and "\n" not in got, (message, got)
    assert load_images(folder(colours, channels=3)).images.shape == (2, 3, 4, 4)  # converting is the cure
    assert load_images(folder(sizes, image_size=4)).images.shape == (2, 1, 4, 4)


def test_a_folder_is_the_set_s_of_the_main_job_at_rhos_size(tmp_path):
    for i in range(3):
        save(tmp_path / "s" / f"{i}.png", RNG.integers(0, 256, size=(10, 12), dtype=np.uint8))
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        c = compose("config", overrides=["experiment=digits_typography", "dataset@perturbation.source=image_folder",
                                         f"perturbation.source.root={tmp_path / 's'}"])
    check_perturbation_set(c.perturbation, c.dataset, (1, 8, 8))
    s = perturbation_set(c.perturbation, load_images(c.dataset), c.dataset)
    assert s.images.shape == (3, 1, 8, 8) and s.names == ["0.png", "1.png", "2.png"]
    alone = load_images(folder(tmp_path / "s", image_size=8))
    torch.testing.assert_close(s.images, alone.images)  # S is the folder at rho's side, as loaded alone


def test_a_folder_is_decoded_once_into_the_stage_cache_keyed_by_names_sizes_and_times(tmp_path):
    images = tmp_path / "images"
    pixels = [save(images / c / f"{i}.png", RNG.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
              for c in ("a", "b") for i in range(2)]
    cache, cfg = StageCache(tmp_path / "stages"), folder(images)
    first = load_images(cfg, cache=cache.arrays)
    assert [e["reused"] for e in cache.log] == [False]
    # Same bytes count and time, other contents: the quick check cannot see it, and the
    # decoded images are reused (no image is opened: this one no longer decodes).
    target = images / "a" / "0.png"
    stat = target.stat()
    target.write_bytes(b"x" * stat.st_size)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load_images(cfg, cache=cache.arrays)
    assert [e["reused"] for e in cache.log] == [False, True]
    assert torch.equal(again.images, first.images) and again.names == first.names == ["a/0.png", "a/1.png",
                                                                                     "b/0.png", "b/1.png"]
    assert again.labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(again.images[3], unit(pixels[3]).permute(2, 0, 1))
    save(target, pixels[0])  # a new time: decoded again
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_images(cfg, cache=cache.arrays)
    assert [e["reused"] for e in cache.log] == [False, True, False]
