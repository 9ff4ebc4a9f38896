"""Figures of paper Secs. 4.3-4.4 and App. E: the signed-image scale, the line-segment cells,
the histogram medians, the per-training-sample influence figures, and a smoke test writing
each figure to PNG."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from diffsens_cli.plots import common, images, influence, synthetic


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_signed_image_centres_zero_and_scales_by_its_own_max():
    rgb = np.zeros((3, 4, 4))
    rgb[:, 0, 0] = [3e-4, 3e-4, 0.0]  # channel mean 2e-4 ...
    rgb[:, 1, 1] = [-9e-4, 0.0, 0.0]  # ... and -3e-4: the largest |mean|
    _, ax = plt.subplots()
    im = common.show_signed(ax, rgb)
    np.testing.assert_allclose(im.get_array(), rgb.mean(axis=0))
    assert im.norm(0.0) == 0.5 and im.norm(3e-4) == pytest.approx(1) and im.norm(-3e-4) == pytest.approx(0)
    np.testing.assert_allclose(im.to_rgba(np.zeros((1, 1)))[0, 0], im.cmap(0.5))  # 0 -> the centre colour
    np.testing.assert_allclose(im.to_rgba(np.full((1, 1), -3e-4))[0, 0], im.cmap(0.0))
    assert common.show_signed(ax, np.zeros((1, 4, 4))).norm.vmax == 1.0  # all zero: no 0/0


def test_line_segment_at_zero_is_the_sample_and_others_are_clipped():
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1, 1, (2, 1, 8, 8))
    psi = 1e3 * rng.standard_normal((2, 1, 8, 8))  # huge against pixels: any a != 0 saturates
    fig = images.line_segments(samples, psi, [-1.0, 0.0, 1.0])
    cells = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in cells[0]] == ["a = -1", "a = 0", "a = 1"]
    for i in range(2):
        np.testing.assert_array_equal(cells[i, 1].images[0].get_array(), (samples[i, 0] + 1) / 2)
        np.testing.assert_array_equal(cells[i, 2].images[0].get_array(), (psi[i, 0] > 0).astype(float))


def test_median_lines_sit_at_the_medians_ignoring_nans():
    ours, ot = np.array([0.1, 0.5, 0.9, np.nan]), np.array([-0.4, 0.0, 0.2, 0.3])
    fig = images.correlation_histograms([("CelebA", ours, ot)])
    ax = fig.axes[0]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [pytest.approx(0.5), pytest.approx(0.1)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sensitivity (ours), median 0.50",
                                                                   "OT baseline, median 0.10"]


def test_change_grid_scales_psi_and_change_separately():
    rng = np.random.default_rng(1)
    base = rng.uniform(-1, 1, (3, 1, 8, 8))
    psi, change = 1e-4 * rng.standard_normal(base.shape), 1e-1 * rng.standard_normal(base.shape)
    axes = np.array(images.change_grid(base, base + change, psi, change, ncol=2).axes).reshape(4, 2)
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
        "hist": images.correlation_histograms([("a", rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50)),
                                              ("b", np.full(5, np.nan), rng.uniform(-1, 1, 50))]),
        "change": images.change_grid(x, x + 10 * psi, psi, 10 * psi, title="change"),
        "rows": images.sensitivity_rows(x, [("Bright", psi), ("Dark", -psi)]),
        "lines": images.line_segments(x[:2], 100 * psi[:2], np.linspace(-2, 2, 5), title="lines"),
        "extremes": influence.influence_extremes(x[:2], x, _extremes_rows(rng, 2, 4, 2, shape), title="extremes"),
        "regression": influence.influence_regression(rng.uniform(1, 2, (2, 9)), rng.uniform(0, 1, (2, 9)),
                                                 [(0.5, 0.1, 0.3), (np.nan, np.nan, np.nan)]),
        "rays": influence.singular_rays(x, np.ones((4, 3)), np.full(4, 4.0), psi[:, None].repeat(3, axis=1),
                                    np.linspace(-500, 500, 3)),
        "vectors": influence.singular_vectors(x, psi[:, None].repeat(3, axis=1), k=2),
        "heatmap": influence.crossclass_heatmap([[1.0, 0.5], [np.nan, np.nan]], ["Male", "Female"], title="classes"),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=40)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def _extremes_rows(rng, num_samples, num_train, k, shape):
    """``influence_extremes`` rows: k top and k bottom training indices with their psi and values."""
    rows = []
    for _ in range(num_samples):
        order = rng.permutation(num_train)
        rows.append({"top": order[:k], "bottom": order[-k:], "top_psi": rng.standard_normal((k, *shape)),
                     "bottom_psi": 1e-6 * rng.standard_normal((k, *shape)), "top_values": rng.uniform(0, 1, k),
                     "bottom_values": rng.uniform(0, 1e-3, k)})
    return rows


def test_influence_extremes_shows_the_chosen_training_images_and_their_psi():
    rng = np.random.default_rng(3)
    samples, train = rng.uniform(-1, 1, (2, 1, 8, 8)), rng.uniform(-1, 1, (10, 1, 8, 8))
    k = 3
    rows = _extremes_rows(rng, 2, 10, k, (1, 8, 8))
    fig = influence.influence_extremes(samples, train, rows)
    axes = np.array(fig.axes).reshape(2, 1 + 4 * k)  # a sample: the sample, top, bottom, top psi, bottom psi
    for m, row in enumerate(rows):
        sample, top, bottom, top_psi, bottom_psi = np.split(axes[m], [1, 1 + k, 1 + 2 * k, 1 + 3 * k])
        assert sample[0].get_ylabel() == f"sample {m}"
        np.testing.assert_array_equal(sample[0].images[0].get_array(), (samples[m, 0] + 1) / 2)
        for key, image_axes, psi_axes in (("top", top, top_psi), ("bottom", bottom, bottom_psi)):
            for j, n in enumerate(row[key]):
                np.testing.assert_array_equal(image_axes[j].images[0].get_array(), (train[n, 0] + 1) / 2)
                assert image_axes[j].get_title() == f"{row[f'{key}_values'][j]:.2g}"
                m_psi = np.abs(row[f"{key}_psi"][j]).max()
                assert psi_axes[j].images[0].norm.vmax == pytest.approx(m_psi)
                assert psi_axes[j].images[0].norm.vmin == pytest.approx(-m_psi)
    headers = {t.get_text(): t.get_position()[0] for t in fig.texts}
    assert set(headers) == {"most influential", "least influential"}
    for label, group in (("most influential", axes[0, 1:1 + k]), ("least influential", axes[0, 1 + k:1 + 2 * k])):
        assert group[0].get_position().x0 < headers[label] < group[-1].get_position().x1  # over its own group


def test_influence_regression_draws_the_fitted_line_and_reports_r2():
    rng = np.random.default_rng(4)
    l2 = rng.uniform(5, 15, (5, 30))
    scores = 2 - 0.1 * l2 + rng.normal(0, 0.1, l2.shape)
    fits = [(-0.1 * (m + 1), 2.0 + m, 0.5 + 0.1 * m) for m in range(5)]
    fig = influence.influence_regression(l2, scores, fits)
    assert len(fig.axes) == 5  # 4 a row: the unused panels of the second row are removed
    for m, (ax, (slope, intercept, r2)) in enumerate(zip(fig.axes, fits)):
        assert ax.get_title() == f"sample {m}: r² = {r2:.2f}"
        (line,) = ax.get_lines()
        np.testing.assert_allclose(line.get_xdata(), [l2[m].min(), l2[m].max()])
        np.testing.assert_allclose(line.get_ydata(), slope * np.array([l2[m].min(), l2[m].max()]) + intercept)
        np.testing.assert_allclose(ax.collections[0].get_offsets(), np.stack([l2[m], scores[m]], axis=1))
        assert ax.get_legend() is None
    assert [ax.get_ylabel() for ax in fig.axes] == ["influence score |ψⁿ|", "", "", "", "influence score |ψⁿ|"]
    fig = influence.influence_regression(l2[:2], scores[:2], fits[:2], residual_scores=2 * scores[:2],
                                     labels=("exact", "clamped"))
    for m, ax in enumerate(fig.axes):
        assert len(ax.collections) == 2
        np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 1], 2 * scores[m])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["exact", "clamped"]


def test_singular_rays_spectrum_and_the_ray_through_the_sample():
    rng = np.random.default_rng(5)
    num_samples, rank, shape = 3, 12, (1, 8, 8)
    samples = rng.uniform(-1, 1, (num_samples, *shape))
    sv = np.sort(rng.exponential(1.0, (num_samples, rank)), axis=1)[:, ::-1]
    frobenius_sq = 1.25 * (sv**2).sum(axis=1)  # the top r explain 80%
    vectors = rng.standard_normal((num_samples, rank, *shape))
    vectors /= np.linalg.norm(vectors.reshape(num_samples, rank, -1), axis=2)[..., None, None, None]
    amplitudes = [-1.0, 0.0, 2.0]
    fig = influence.singular_rays(samples, sv, frobenius_sq, vectors, amplitudes, num_rays=2)
    spectrum = next(ax for ax in fig.axes if ax.get_title() == "variance explained by the top singular directions")
    curves, median = spectrum.get_lines()[:num_samples], spectrum.get_lines()[num_samples]
    for m, curve in enumerate(curves):
        np.testing.assert_allclose(curve.get_xdata(), np.arange(1, rank + 1))
        assert curve.get_ydata()[-1] == pytest.approx(0.8)
        np.testing.assert_allclose(curve.get_ydata(), np.cumsum(sv[m] ** 2) / frobenius_sq[m])
    rank10 = np.cumsum(sv**2, axis=1)[:, 9] / frobenius_sq
    assert median.get_ydata()[0] == pytest.approx(np.median(rank10)) and median.get_linestyle() == "--"
    assert spectrum.get_ylim() == (0, 1)
    rays = np.array([ax for ax in fig.axes if ax is not spectrum]).reshape(2, 3)
    assert [ax.get_title() for ax in rays[0]] == ["a = -1", "a = 0", "a = 2"]
    assert rays[0, 1].title.get_fontweight() == "bold" and rays[0, 0].title.get_fontweight() == "normal"
    assert [ax.get_ylabel() for ax in rays[:, 0]] == ["u1", "u2"]
    for i in range(2):
        np.testing.assert_array_equal(rays[i, 1].images[0].get_array(), (samples[0, 0] + 1) / 2)  # a = 0: x
        expected = (np.clip(samples[0, 0] + 2.0 * vectors[0, i, 0], -1, 1) + 1) / 2
        np.testing.assert_allclose(rays[i, 2].images[0].get_array(), expected)
    fig = influence.singular_rays(None, sv, frobenius_sq, None, amplitudes)
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == num_samples + 1
    fig = influence.singular_rays(None, sv[:, :5], frobenius_sq, None, amplitudes)  # r < 10: no median line
    assert len(fig.axes[0].get_lines()) == num_samples


def test_singular_vectors_rows_scale_each_vector_by_its_own_max():
    rng = np.random.default_rng(6)
    samples = rng.uniform(-1, 1, (2, 1, 8, 8))
    vectors = rng.standard_normal((2, 5, 1, 8, 8)) * np.array([1.0, 1e-3, 1e3, 1.0, 1.0])[None, :, None, None, None]
    axes = np.array(influence.singular_vectors(samples, vectors, k=3).axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0, 1:]] == ["u1", "u2", "u3"]
    for m in range(2):
        np.testing.assert_array_equal(axes[m, 0].images[0].get_array(), (samples[m, 0] + 1) / 2)
        for i in range(3):
            assert axes[m, 1 + i].images[0].norm.vmax == pytest.approx(np.abs(vectors[m, i]).max())


def test_crossclass_heatmap_writes_cell_values_and_masks_nan():
    matrix = np.array([[0.5, 0.1, 0.2], [np.nan, np.nan, np.nan], [0.05, 0.3, 0.012345]])
    fig = influence.crossclass_heatmap(matrix, ["a", "b", "c"])
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), np.isnan(matrix))
    texts = {(t.get_position()[1], t.get_position()[0]): t for t in ax.texts}  # (row, column) -> text
    assert len(texts) == 9
    assert [texts[1, j].get_text() for j in range(3)] == ["–"] * 3
    assert texts[2, 2].get_text() == "0.012" and texts[0, 0].get_text() == "0.5"
    assert texts[2, 2].get_color() == "white" and texts[0, 0].get_color() == "black"  # the extremes: contrast
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training class", "model-sample class")
    assert fig.axes[1].get_ylabel() == "mean influence score"  # the colour bar


def test_a_perturbation_mean_far_off_the_data_leaves_the_toy_plots_drawable():
    """nu's mean at 1e30 (psi all zero): the plots keep the data's frame and leave the star
    out rather than stretching the axes to 1e30 (a singular transform, a traceback)."""
    rng = np.random.default_rng(0)
    support = np.stack([np.linspace(-1.5, 1.5, 30), np.sin(np.linspace(-3, 3, 30))], 1)
    path = rng.normal(size=(5, 4, 2))
    far = np.array([1e30, 1e30])
    fig = synthetic.sample_paths(path, np.zeros((4, 2)), path[-1], 0.1, support, far)
    fig.canvas.draw()
    assert fig.axes[0].get_ylim()[1] < 2
    grid = np.stack(np.meshgrid(np.linspace(-2, 2, 5), np.linspace(-2, 2, 5)), -1).reshape(-1, 2)
    fig = synthetic.score_sensitivity_field(grid, np.zeros((1, 25, 2)), [0.5], support, far)
    fig.canvas.draw()
    assert fig.axes[0].get_xlim()[1] < 3
    near = synthetic.sample_paths(path, np.zeros((4, 2)), path[-1], 0.1, support, np.array([0.0, -3.0]))
    assert near.axes[0].get_ylim()[0] == pytest.approx(-3.4)  # a mean near the data is drawn and framed


def test_remainder_panels_of_zero_remainders_say_so_without_a_log_warning():
    import warnings

    curves = [("ode", "step 0.05", {"remainder_over_eta": np.zeros(3)}),
              ("sde", "step 0.05", {"remainder_over_eta": np.array([1e-3, 0.0, 1e-5])})]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = synthetic.remainder_panels([0.1, 0.01, 0.001], curves)
        fig.canvas.draw()
    assert fig.axes[0].texts[0].get_text() == "no positive remainder" and not fig.axes[1].texts
    assert fig.axes[1].get_yscale() == "log" and fig.axes[1].get_xscale() == "log"  # y shared by the panels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = synthetic.remainder_panels([0.1, 0.01, 0.001], curves[:1])
        fig.canvas.draw()
    assert fig.axes[0].get_yscale() == "linear"
