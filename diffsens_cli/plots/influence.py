"""Figures of per-training-image influence: paper Figs. 8-14 (influence) and its cost
(bench_influence)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from diffsens_cli.plots.common import canvas_panels, cell_inches, rows_canvas, show_image, show_signed


def influence_extremes(samples, train_images, rows: list[dict], title: str | None = None,
                       top_label: str = "most influential", bottom_label: str = "least influential") -> plt.Figure:
    """Paper Figs. 8 and 12 (and the images of Figs. 9 and 13): a pair of rows a model sample m.
    The upper row shows the sample, then the training images ``rows[m]["top"]`` and
    ``rows[m]["bottom"]`` (each with its ``top_values`` / ``bottom_values`` over it); the lower
    row shows, under each training image n, its signed psi^n (``top_psi`` / ``bottom_psi``),
    each scaled by its own max |value|, so that one sees how that image moves the sample.
    Axes are created a sample at a time: sample, top, bottom, then top psi, bottom psi."""
    samples, train_images = np.asarray(samples, dtype=float), np.asarray(train_images, dtype=float)
    k_top = max(len(row["top"]) for row in rows)
    k_bottom = max(len(row["bottom"]) for row in rows)
    cell, spacer = cell_inches(samples), 0.25  # spacer: a narrow empty column between groups, a low row between samples
    ncol = 1 + 1 + k_top + 1 + k_bottom
    first_top, first_bottom = 2, 3 + k_top  # columns
    head = 0.35 + (0.35 if title else 0)  # inches above the grid for the group headers (and title)
    width = cell * (1 + k_top + k_bottom + 2 * spacer) + 0.4
    height = len(rows) * ((2 + spacer) * cell + 0.7) - spacer * cell + head
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(3 * len(rows) - 1, ncol, width_ratios=[1, spacer] + [1] * k_top + [spacer] + [1] * k_bottom,
                            height_ratios=([1, 1, spacer] * len(rows))[:-1])
    groups = {}  # header -> axes of its first row, to place it
    for m, row in enumerate(rows):
        ax = fig.add_subplot(grid[3 * m, 0])
        show_image(ax, samples[m])
        ax.set_ylabel(f"sample {m}", fontsize=9)
        lower = []
        for key, first, label in (("top", first_top, top_label), ("bottom", first_bottom, bottom_label)):
            values = row.get(f"{key}_values")
            upper = []
            for j, n in enumerate(np.asarray(row[key], dtype=int)):
                ax = fig.add_subplot(grid[3 * m, first + j])
                show_image(ax, train_images[n])
                if values is not None:
                    ax.set_title(f"{float(values[j]):.2g}", fontsize=7, pad=2)
                upper.append(ax)
            if m == 0 and upper:
                groups[label] = upper
            lower.extend((first + j, psi) for j, psi in enumerate(np.asarray(row[f"{key}_psi"], dtype=float)))
        for column, psi in lower:
            show_signed(fig.add_subplot(grid[3 * m + 1, column]), psi)
    top = 1 - head / height
    fig.tight_layout(h_pad=0.3, w_pad=0.2, rect=(0, 0, 1, top))
    for label, axes in groups.items():
        x = (axes[0].get_position().x0 + axes[-1].get_position().x1) / 2
        fig.text(x, top + 0.1 / height, label, ha="center", va="bottom", fontsize=10)
    if title:
        fig.suptitle(title, y=1 - 0.05 / height, va="top")
    return fig


def influence_regression(l2, scores, fits: list[tuple[float, float, float]], residual_scores=None,
                         labels: tuple[str, str] = ("clamped", "exact weights")) -> plt.Figure:
    """Paper Sec. 4.4 (Fig. 9's statistic): a panel a model sample m, the influence scores
    |psi^n| of the training images against their L2 distance to the sample, with the fitted
    line (slope, intercept) and its r² in the title: does influence just follow distance?
    ``residual_scores`` (e.g. without the weight clamp), if given, are drawn alongside;
    ``labels`` name the two."""
    l2, scores = np.asarray(l2, dtype=float), np.asarray(scores, dtype=float)
    m_count = len(l2)
    ncol = min(4, m_count)
    nrow = -(-m_count // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.9 * nrow), squeeze=False)
    for ax in axes.flat[m_count:]:
        fig.delaxes(ax)
    for m, (ax, (slope, intercept, r2)) in enumerate(zip(axes.flat, fits)):
        labelled = residual_scores is not None
        ax.scatter(l2[m], scores[m], s=5, alpha=0.4, color="C0", lw=0, label=labels[0] if labelled else None)
        if labelled:
            ax.scatter(l2[m], np.asarray(residual_scores[m], dtype=float), s=5, alpha=0.4, color="C1", lw=0,
                       label=labels[1])
        finite = l2[m][np.isfinite(l2[m])]
        if finite.size:
            xs = np.array([finite.min(), finite.max()])
            ax.plot(xs, slope * xs + intercept, color="crimson", lw=1.2)
        ax.set_title(f"sample {m}: r² = {r2:.2f}", fontsize=9)
        ax.set_xlabel("L2 distance to the model sample", fontsize=8)
        if m % ncol == 0:
            ax.set_ylabel("influence score |ψⁿ|", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if labelled:
            ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


def _singular_spectrum(ax, singular_values, frobenius_sq) -> None:
    """Cumulative fraction of ||Psi||_F^2 explained by the top i singular values, a line a
    model sample, with a dashed line at the median over samples at rank 10."""
    sv = np.asarray(singular_values, dtype=float)
    frobenius_sq = np.asarray(frobenius_sq, dtype=float).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        explained = np.cumsum(sv**2, axis=1) / frobenius_sq
    ranks = np.arange(1, sv.shape[1] + 1)
    for curve in explained:
        ax.plot(ranks, curve, lw=0.8, alpha=0.7, color="C0")
    if sv.shape[1] >= 10 and np.isfinite(explained[:, 9]).any():
        median = float(np.nanmedian(explained[:, 9]))
        ax.axhline(median, color="crimson", ls="--", lw=1, label=f"median at rank 10: {median:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(0, 1)
    ax.set_xlim(1, max(2, sv.shape[1]))
    ax.set_xlabel("rank i")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title("variance explained by the top singular directions", fontsize=10)
    ax.grid(True, alpha=0.3)


def singular_rays(samples, singular_values, frobenius_sq, singular_vectors, amplitudes,
                  num_rays: int = 3) -> plt.Figure:
    """Paper Fig. 10: how low-rank the map from training weights to a sample is, as the
    cumulative explained variance of the singular values of Psi (a line a model sample), and,
    for the first model sample x when ``singular_vectors`` [M, r, C, H, W] are given, a row a
    top right singular vector u_i of the images x + a u_i clipped to [-1, 1] (a column an
    amplitude a): what the main directions of influence look like."""
    amplitudes = np.asarray(amplitudes, dtype=float).ravel()
    if singular_vectors is None:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        _singular_spectrum(ax, singular_values, frobenius_sq)
        fig.tight_layout()
        return fig
    x = np.asarray(samples, dtype=float)[0]
    vectors = np.asarray(singular_vectors, dtype=float)[0]
    nrow = min(num_rays, len(vectors))
    cell = cell_inches(x)
    fig = plt.figure(figsize=(4.8 + cell * len(amplitudes), max(3.8, cell * nrow + 0.6)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=(4.8, cell * len(amplitudes)))
    _singular_spectrum(left.subplots(), singular_values, frobenius_sq)
    axes = right.subplots(nrow, len(amplitudes), squeeze=False)
    for i in range(nrow):
        for j, a in enumerate(amplitudes):
            show_image(axes[i, j], np.clip(x + a * vectors[i], -1, 1))
        axes[i, 0].set_ylabel(f"u{i + 1}", fontsize=9)
    for ax, a in zip(axes[0], amplitudes):
        ax.set_title(f"a = {a:g}", fontsize=9, fontweight="bold" if a == 0 else "normal")  # a = 0: the sample
    right.suptitle("sample 0 along its top singular directions", fontsize=10)
    return fig


def singular_vectors(samples, vectors, k: int = 10) -> plt.Figure:
    """Paper Fig. 14: a row a model sample, the sample and then its top ``k`` right singular
    vectors u_1..u_k [M, r, C, H, W] of Psi, signed, each scaled by its own max |value|
    (a singular vector's sign is arbitrary): the directions the training data move it most."""
    samples, vectors = np.asarray(samples, dtype=float), np.asarray(vectors, dtype=float)
    k = min(k, vectors.shape[1])
    cell = cell_inches(samples)
    nrow = len(samples)
    fig, axes = plt.subplots(nrow, 1 + k, figsize=(cell * (1 + k) + 0.3, nrow * (cell + 0.15) + 0.3), squeeze=False)
    for m in range(nrow):
        show_image(axes[m, 0], samples[m])
        axes[m, 0].set_ylabel(f"sample {m}", fontsize=9)
        for i in range(k):
            show_signed(axes[m, 1 + i], vectors[m, i])
    axes[0, 0].set_title("sample", fontsize=9)
    for i, ax in enumerate(axes[0, 1:]):
        ax.set_title(f"u{i + 1}", fontsize=9)
    fig.tight_layout(h_pad=0.8, w_pad=0.3)  # h_pad: room for the scales under the signed rows
    return fig


def clamp_diagnosis(diagnosis: dict, weights: tuple[str, ...]) -> plt.Figure:
    """What the weight clamp does to the influence scores, per model sample and for each
    weights (``pipelines.attribution.clamp_diagnosis``): the share of weights on the clamp's
    floor, R^2 of the affine fit psi^n ~ A x_n + b, and Spearman of |psi^n| with L2 distance."""
    panels = (("share_clamped_low", "share of weights on the floor"), ("affine_r2", "R² of ψⁿ ~ A xₙ + b"),
              ("spearman_l2", "Spearman(|ψⁿ|, L2 distance)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    count = len(diagnosis[weights[0]][panels[0][0]]["per_sample"])
    width = 0.8 / len(weights)
    for ax, (key, title) in zip(axes, panels):
        for c, name in enumerate(weights):
            values = diagnosis[name][key]["per_sample"]
            ax.bar(np.arange(count) + (c - (len(weights) - 1) / 2) * width, values, width, label=name, color=f"C{c}")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("model sample", fontsize=8)
        ax.set_xticks(np.arange(count))
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def attribution_tops(samples, train_images, tops: dict[str, np.ndarray]) -> plt.Figure:
    """Each method's top training images side by side for the same model samples: a panel
    a sample, a row a method (``tops[name]`` [M, k] image indices, most influential first),
    the sample itself at the left of every row."""
    samples, train_images = np.asarray(samples, dtype=float), np.asarray(train_images, dtype=float)
    names = list(tops)
    k = max(v.shape[1] for v in tops.values())
    canvases = [rows_canvas([[samples[m], *(train_images[int(n)] for n in tops[name][m][:k])] for name in names], 1)
                for m in range(len(samples))]
    return canvas_panels(canvases, names, [f"sample {m}: top {k} per method" for m in range(len(samples))], 1 + k)


def crossclass_heatmap(matrix, class_names: list[str], title: str | None = None) -> plt.Figure:
    """Paper Fig. 11: entry (i, j) the mean influence score of class-j training images on
    model samples of class i, written in its cell; a diagonal that stands out says that a
    sample is shaped mostly by its own class. NaN rows (no sample of that class) are grey."""
    matrix = np.asarray(matrix, dtype=float)
    masked = np.ma.masked_invalid(matrix)
    size = len(matrix)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    fig, ax = plt.subplots(figsize=(0.6 * size + 2.4, 0.6 * size + 1.6 + (0.3 if title else 0)))
    finite = np.isfinite(matrix)
    limits = (float(matrix[finite].min()), float(matrix[finite].max())) if finite.any() else (0.0, 1.0)
    im = ax.imshow(masked, cmap=cmap, vmin=limits[0], vmax=limits[1])
    fig.colorbar(im, ax=ax, fraction=0.046, label="mean influence score")
    fontsize = 9 if size <= 6 else 7
    for i in range(size):
        for j in range(size):
            if finite[i, j]:
                colour = "white" if im.norm(matrix[i, j]) < 0.5 else "black"  # viridis: dark low, light high
                ax.text(j, i, f"{matrix[i, j]:.2g}", ha="center", va="center", color=colour, fontsize=fontsize)
            else:
                ax.text(j, i, "–", ha="center", va="center", color="black", fontsize=fontsize)
    ax.set_xticks(range(size), class_names, rotation=45 if max(map(len, map(str, class_names))) > 3 else 0)
    ax.set_yticks(range(size), class_names)
    ax.set_xlabel("training class")
    ax.set_ylabel("model-sample class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def influence_cost(runs: dict[str, dict], accuracy: dict[str, dict]) -> plt.Figure:
    """The influence benchmark: wall time and network vectors of ``exact`` and ``sketch``
    against the number N of training images (``runs`` keyed ``<method>/<N>``), and the
    sketch's agreement with exact (Spearman of the scores, top-10 overlap) against the
    number m of projections (``accuracy`` keyed by m)."""
    fig, (ax_time, ax_vec, ax_acc) = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, colour in (("exact", "C3"), ("sketch", "C0")):
        rows = sorted((int(k.split("/")[1]), v) for k, v in runs.items() if k.startswith(method + "/"))
        n = [r[0] for r in rows]
        ax_time.plot(n, [r[1]["wall_time_s"] for r in rows], "o-", color=colour, label=method)
        ax_vec.plot(n, [r[1]["network_vectors"] for r in rows], "o-", color=colour, label=method)
    for ax, label in ((ax_time, "wall time per model sample (s)"), (ax_vec, "network vectors per model sample")):
        ax.set(xscale="log", yscale="log", xlabel="training images N", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = sorted(int(k) for k in accuracy)
    ax_acc.plot(m, [accuracy[str(k)]["spearman"] for k in m], "o-", label="Spearman of the scores")
    ax_acc.plot(m, [accuracy[str(k)]["top10_overlap"] for k in m], "s--", label="top-10 overlap")
    ax_acc.axhline(0.95, color="gray", ls=":", lw=0.8)
    ax_acc.set(xscale="log", xlabel="projections m", ylabel="agreement with exact", ylim=(0, 1.02),
               title="sketch against exact")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return fig
