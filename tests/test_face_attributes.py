"""The pixel-statistic attributes of the embedded LFW faces (the CelebA stand-in's Bald,
Goatee, ... for App. E): quartile counts, what they mean in pixels, and selection of S."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import lfw_subset

from diffsens_cli.data import load_images, perturbation_set
from diffsens_cli.data.base import draw
from diffsens_cli.data.embedded import FACE_ATTRIBUTES, FACE_CENTRE, face_attributes


def cfg(**kw) -> dict:
    return {"kind": "lfw_faces", "root": None, "image_size": None, "limit": None, "seed": 0, **kw}


@pytest.fixture(scope="module")
def faces():
    return load_images(cfg())


@pytest.fixture(scope="module")
def native() -> np.ndarray:
    return np.asarray(lfw_subset()[:100])


def test_each_attribute_is_a_quarter(faces):
    assert list(faces.attributes) == list(FACE_ATTRIBUTES)
    for name, mask in faces.attributes.items():
        assert mask.dtype == torch.bool and mask.shape == (100,)
        assert int(mask.sum()) == 25, name


def test_bright_and_dark_mean_what_they_say(faces, native):
    bright, dark = faces.attributes["Bright"].numpy(), faces.attributes["Dark"].numpy()
    assert not (bright & dark).any()
    centre = native[:, FACE_CENTRE, FACE_CENTRE].mean(axis=(1, 2))
    assert centre[bright].min() > centre[~bright].max()  # exactly the top quarter of the statistic
    assert centre[dark].max() < centre[~dark].min()
    whole = native.mean(axis=(1, 2))  # and brighter as whole images too, not only in the centre
    assert whole[bright].mean() > whole[dark].mean() + 0.1
    left_minus_right = native[:, :, :12].mean(axis=(1, 2)) - native[:, :, 13:].mean(axis=(1, 2))
    assert left_minus_right[faces.attributes["Lit_From_Left"].numpy()].min() > np.median(left_minus_right)


def test_ties_keep_exact_counts_and_disjoint_quarters():
    flat = np.full((10, 25, 25), 0.5)  # every statistic tied
    masks = face_attributes(flat)
    assert all(int(m.sum()) == 2 for m in masks.values())
    assert not (masks["Bright"] & masks["Dark"]).any()


def test_attributes_follow_limit_draws_and_resizing(faces):
    drawn = load_images(cfg(limit=40, seed=3, image_size=24))
    index = draw(100, 40, 3)
    assert drawn.images.shape == (40, 1, 24, 24)
    for name in FACE_ATTRIBUTES:
        assert torch.equal(drawn.attributes[name], faces.attributes[name][index])


def test_perturbation_set_selects_by_expression(faces):
    p = {"kind": "image_set", "direction": "add", "source": None, "classes": None,
         "attributes": "Bright and not High_Contrast", "scores_file": None, "top_k": None, "num_samples": None,
         "seed": 0}
    s = perturbation_set(p, faces, cfg())
    expected = faces.attributes["Bright"] & ~faces.attributes["High_Contrast"]
    assert 0 < len(s) == int(expected.sum()) < 25
    assert torch.equal(s.images, faces.images[expected])
    assert s.attributes["Bright"].all() and not s.attributes["High_Contrast"].any()
