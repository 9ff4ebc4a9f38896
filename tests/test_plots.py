"""Figures of paper Sec. 4.3 and App. E: the signed-image scale, the line-segment cells,
the histogram medians, and a smoke test writing each figure to PNG."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from diffsens_cli import plots


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_signed_image_centres_zero_and_scales_by_its_own_max():
    rgb = np.zeros((3, 4, 4))
    rgb[:, 0, 0] = [3e-4, 3e-4, 0.0]  # channel mean 2e-4 ...
    rgb[:, 1, 1] = [-9e-4, 0.0, 0.0]  # ... and -3e-4: the largest |mean|
    _, ax = plt.subplots()
    im = plots._show_signed(ax, rgb)
    np.testing.assert_allclose(im.get_array(), rgb.mean(axis=0))
    assert im.norm(0.0) == 0.5 and im.norm(3e-4) == pytest.approx(1) and im.norm(-3e-4) == pytest.approx(0)
    np.testing.assert_allclose(im.to_rgba(np.zeros((1, 1)))[0, 0], im.cmap(0.5))  # 0 -> the centre colour
    np.testing.assert_allclose(im.to_rgba(np.full((1, 1), -3e-4))[0, 0], im.cmap(0.0))
    assert plots._show_signed(ax, np.zeros((1, 4, 4))).norm.vmax == 1.0  # all zero: no 0/0


def test_line_segment_at_zero_is_the_sample_and_others_are_clipped():
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1, 1, (2, 1, 8, 8))
    psi = 1e3 * rng.standard_normal((2, 1, 8, 8))  # huge against pixels: any a != 0 saturates
    fig = plots.line_segments(samples, psi, [-1.0, 0.0, 1.0])
    cells = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in cells[0]] == ["a = -1", "a = 0", "a = 1"]
    for i in range(2):
        np.testing.assert_array_equal(cells[i, 1].images[0].get_array(), (samples[i, 0] + 1) / 2)
        np.testing.assert_array_equal(cells[i, 2].images[0].get_array(), (psi[i, 0] > 0).astype(float))


def test_median_lines_sit_at_the_medians_ignoring_nans():
    ours, ot = np.array([0.1, 0.5, 0.9, np.nan]), np.array([-0.4, 0.0, 0.2, 0.3])
    fig = plots.correlation_histograms([("CelebA", ours, ot)])
    ax = fig.axes[0]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [pytest.approx(0.5), pytest.approx(0.1)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sensitivity (ours), median 0.50",
                                                                   "OT baseline, median 0.10"]


def test_change_grid_scales_psi_and_change_separately():
    rng = np.random.default_rng(1)
    base = rng.uniform(-1, 1, (3, 1, 8, 8))
    psi, change = 1e-4 * rng.standard_normal(base.shape), 1e-1 * rng.standard_normal(base.shape)
    axes = np.array(plots.change_grid(base, base + change, psi, change, ncol=2).axes).reshape(4, 2)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["base", "perturbed", "sensitivity ψ", "actual change"]
    for j in range(2):
        assert axes[2, j].images[0].norm.vmax == pytest.approx(np.abs(psi[j]).max())
        assert axes[3, j].images[0].norm.vmin == pytest.approx(-np.abs(change[j]).max())


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 24, 24), (3, 64, 64)])
def test_figures_write_png(tmp_path, shape):
    """Smoke test: each figure draws and saves to PNG for grey digits, faces and RGB images."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (4, *shape))
    psi = 1e-3 * rng.standard_normal(x.shape)
    figures = {
        "hist": plots.correlation_histograms([("a", rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50)),
                                              ("b", np.full(5, np.nan), rng.uniform(-1, 1, 50))]),
        "change": plots.change_grid(x, x + 10 * psi, psi, 10 * psi, title="change"),
        "rows": plots.sensitivity_rows(x, [("Bright", psi), ("Dark", -psi)]),
        "lines": plots.line_segments(x[:2], 100 * psi[:2], np.linspace(-2, 2, 5), title="lines"),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=40)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
