"""Figures of image models: training (samples, loss), paper Figs. 5-7 (predict_change), App. E
Figs. 15-16 (attribute_sensitivity) and the convergence of psi (psi_convergence)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from diffsens_cli.plots.common import cell_inches, show_image, show_signed


def image_grid(images, ncol: int = 8, title: str | None = None) -> plt.Figure:
    """Images [N, C, H, W] in [-1, 1] on a grid (greyscale when C = 1)."""
    images = np.clip((np.asarray(images) + 1) / 2, 0, 1)
    n = len(images)
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.1 * ncol, 1.1 * nrow + (0.3 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, images):
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.transpose(1, 2, 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curve(losses, window: int = 50) -> plt.Figure:
    """Training loss per step, with a running mean over ``window`` steps."""
    losses = np.asarray(losses)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, label="per step")
    if len(losses) >= window:
        mean = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), mean, lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising score-matching loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def correlation_histograms(panels: list[tuple[str, np.ndarray, np.ndarray]]) -> plt.Figure:
    """Paper Figs. 5 and 6: one panel a (title, ours, ot) of overlapping histograms over [-1, 1]
    of per-sample correlations with the actual change, ours and the OT baseline's, each with a
    dashed line at its median (NaNs ignored)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for ax, (title, ours, ot) in zip(axes[0], panels):
        for values, label, colour in ((ours, "sensitivity (ours)", "tab:blue"), (ot, "OT baseline", "tab:orange")):
            values = np.asarray(values, dtype=float).ravel()
            values = values[np.isfinite(values)]
            if values.size == 0:
                ax.hist([], bins=bins, color=colour, alpha=0.6, label=f"{label}, no finite values")
                continue
            median = float(np.median(values))
            ax.hist(values, bins=bins, color=colour, alpha=0.6, label=f"{label}, median {median:.2f}")
            ax.axvline(median, color=colour, ls="--", lw=1.5)
        ax.set_xlim(-1, 1)
        ax.set_xticks(np.linspace(-1, 1, 5))
        ax.set_ylim(0, 1.35 * ax.get_ylim()[1])  # headroom for the legend
        ax.set_title(title)
        ax.set_xlabel("correlation with actual change")
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("samples")
    fig.tight_layout()
    return fig


def change_grid(base, perturbed, psi, change, title: str | None = None, ncol: int = 8) -> plt.Figure:
    """Paper Fig. 7: for the first ``ncol`` samples (columns), rows of base samples, perturbed
    samples, sensitivities psi and actual changes (perturbed - base); the last two signed, each
    scaled by its own max |value| (written under it), as psi and the change differ in scale."""
    n = min(ncol, len(base))
    cell = cell_inches(base)
    fig, axes = plt.subplots(4, n, figsize=(cell * n + 0.3, 4 * cell + 0.6 + (0.3 if title else 0)), squeeze=False)
    for j in range(n):
        show_image(axes[0, j], base[j])
        show_image(axes[1, j], perturbed[j])
        show_signed(axes[2, j], psi[j])
        show_signed(axes[3, j], change[j])
    for ax, label in zip(axes[:, 0], ("base", "perturbed", "sensitivity ψ", "actual change")):
        ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.8, w_pad=0.3)  # h_pad: room for the scales under the signed rows
    return fig


def sensitivity_rows(samples, rows: list[tuple[str, np.ndarray]], ncol: int = 8) -> plt.Figure:
    """Paper Fig. 15: the first ``ncol`` samples on top, then one row of signed sensitivities
    [N, C, H, W] a (label, psi), each image scaled by its own max |value|."""
    n = min(ncol, len(samples))
    cell = cell_inches(samples)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(cell * n + 0.3, (1 + len(rows)) * (cell + 0.15) + 0.3),
                             squeeze=False)
    for j in range(n):
        show_image(axes[0, j], samples[j])
        for i, (_, psi) in enumerate(rows, start=1):
            show_signed(axes[i, j], psi[j])
    for ax, label in zip(axes[:, 0], ["sample", *(label for label, _ in rows)]):
        ax.set_ylabel(label, fontsize=9)
    fig.tight_layout(h_pad=0.8, w_pad=0.3)  # h_pad: room for the scales under the signed rows
    return fig


def line_segments(samples, psi, coefficients, title: str | None = None) -> plt.Figure:
    """Paper Fig. 16: a row a sample x, a column a coefficient a, each cell x + a * psi clipped
    to [-1, 1]. ``psi`` is taken as given: psi may be tiny or huge against pixel values, so the
    caller scales it (e.g. to a max |value| of 1) to make the segment visible."""
    samples, psi = np.asarray(samples, dtype=float), np.asarray(psi, dtype=float)
    coefficients = np.asarray(coefficients, dtype=float).ravel()
    cell = cell_inches(samples)
    nrow, ncol = len(samples), len(coefficients)
    fig, axes = plt.subplots(nrow, ncol, figsize=(cell * ncol, cell * nrow + 0.3 + (0.3 if title else 0)),
                             squeeze=False)
    for i in range(nrow):
        for j, a in enumerate(coefficients):
            show_image(axes[i, j], np.clip(samples[i] + a * psi[i], -1, 1))
    for ax, a in zip(axes[0], coefficients):
        ax.set_title(f"a = {a:g}", fontsize=9, fontweight="bold" if a == 0 else "normal")  # a = 0: the sample
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.3, w_pad=0.3)
    return fig


def cost_accuracy(rows: dict[str, dict], paper_label: str | None = None) -> plt.Figure:
    """psi's accuracy against its cost, one point per solver setting: the median relative
    difference to the converged reference (dots) and between two probe seeds (crosses),
    against score evaluations x tangents per sample, with the 5% and 10% lines and the
    paper setting's cost."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, row in rows.items():
        if label == "reference":
            continue
        x = row["tangent_evaluations"]
        ax.scatter(x, row["median_rel_diff_psi_to_reference"], color="C0", s=18, zorder=3)
        ax.annotate(label, (x, row["median_rel_diff_psi_to_reference"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
        if "median_rel_diff_psi_between_seeds" in row:
            ax.scatter(x, row["median_rel_diff_psi_between_seeds"], color="C3", marker="x", s=18, zorder=3)
    for level, style in ((0.05, "--"), (0.10, ":")):
        ax.axhline(level, color="gray", ls=style, lw=0.8)
    if paper_label in rows:
        ax.axvline(rows[paper_label]["tangent_evaluations"], color="C2", lw=0.8, label="paper setting's cost")
    ax.scatter([], [], color="C0", s=18, label="to the reference")
    ax.scatter([], [], color="C3", marker="x", s=18, label="between probe seeds")
    ax.set(xscale="log", yscale="log", xlabel="score evaluations x tangents per sample",
           ylabel="median |psi - psi'| / |psi'|", title="How accurate is psi?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
