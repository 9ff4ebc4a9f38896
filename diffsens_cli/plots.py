"""Figures. Each function draws from arrays and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANEL_TITLES = {"ode": "PF-ODE, forward Euler", "sde": "SDE, Euler-Maruyama", "hutchinson": "Hutchinson (ODE)"}


def remainder_panels(etas, curves) -> plt.Figure:
    """Paper Fig. 3: median |R(eta)|/eta against eta, log-log, one panel a study."""
    panels = list(dict.fromkeys(p for p, _, _ in curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for p, label, arrays in curves:
            if p != panel:
                continue
            style = "--" if label == "exact density" else ":" if "rademacher" in label else "-"
            r = np.asarray(arrays["remainder_over_eta"], dtype=float)
            ax.plot(etas, np.where(r > 0, r, np.nan), style, marker="o", ms=3, label=label)  # log axes: > 0 only
        ax.set_xscale("log")
        if ax.has_data() and any(np.nanmax(line.get_ydata(), initial=0) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no positive remainder", transform=ax.transAxes, ha="center")
        ax.set_title(PANEL_TITLES.get(panel, panel))
        ax.set_xlabel(r"$\bar\eta$")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(r"median $|R(\bar\eta)| / \bar\eta$")
    fig.tight_layout()
    return fig


def score_sensitivity_field(grid, fields, times, support, nu_mean) -> plt.Figure:
    """Paper Fig. 1: the vector field g_t over the plane at a few times."""
    fig, axes = plt.subplots(1, len(times), figsize=(4.2 * len(times), 4.2), squeeze=False)
    for ax, g, t in zip(axes[0], fields, times):
        g = np.asarray(g, dtype=float)
        norm = np.linalg.norm(g, axis=1)
        nonzero = norm > 0  # g_t = 0 (e.g. nu_t/rho_t underflowed) has no direction and no log: no arrow
        direction = np.divide(g, norm[:, None], out=np.zeros_like(g), where=nonzero[:, None])
        log_norm = np.ma.masked_array(np.log10(norm, out=np.zeros_like(norm), where=nonzero), mask=~nonzero)
        ax.scatter(support[:, 0], support[:, 1], s=2, c="0.3", label=r"supp $\rho$")
        q = ax.quiver(grid[:, 0], grid[:, 1], direction[:, 0], direction[:, 1], log_norm,
                      cmap="viridis", angles="xy", scale=30, width=0.004)
        if _near(nu_mean, grid):
            ax.plot(*nu_mean, marker="*", ms=14, c="crimson", ls="", label=r"$\nu$ mean")
        ax.set_title(f"$g_t$ at t = {t:g}" + ("" if nonzero.any() else " (zero)"))
        ax.set_aspect("equal")
        fig.colorbar(q, ax=ax, fraction=0.046, label=r"$\log_{10} |g_t|$")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _near(point: np.ndarray, points: np.ndarray, spans: float = 3.0) -> bool:
    """Whether ``point`` lies within ``spans`` times the extent of ``points`` from their box
    (a perturbation's mean far off the data would squash the plot to nothing)."""
    lo, hi = points.min(0), points.max(0)
    reach = spans * np.maximum(hi - lo, 1e-12)
    return bool(np.all(np.isfinite(point)) and np.all((point >= lo - reach) & (point <= hi + reach)))


def sample_paths(path, psi, perturbed, eta, support, nu_mean) -> plt.Figure:
    """Paper Fig. 2: sample paths, their sensitivities at t1 (arrows eta psi), and the
    perturbed model's samples from the same noise."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(support[:, 0], support[:, 1], s=2, c="0.6", label=r"supp $\rho$")
    for i in range(path.shape[1]):
        ax.plot(path[:, i, 0], path[:, i, 1], c="tab:blue", lw=0.4, alpha=0.35)
    end = path[-1]
    ax.scatter(end[:, 0], end[:, 1], s=8, c="tab:blue", label=r"samples $\Phi^0(z_0)$", zorder=3)
    ax.quiver(end[:, 0], end[:, 1], eta * psi[:, 0], eta * psi[:, 1], angles="xy", scale_units="xy", scale=1,
              color="tab:orange", width=0.004, label=rf"$\bar\eta\,\psi$ ($\bar\eta$={eta:g})", zorder=4)
    ax.scatter(perturbed[:, 0], perturbed[:, 1], s=8, marker="x", c="crimson",
               label=r"perturbed $\Phi^{\bar\eta}(z_0)$", zorder=5)
    shown = support
    if _near(nu_mean, support):
        ax.plot(*nu_mean, marker="*", ms=14, c="crimson", ls="")
        shown = np.vstack([support, nu_mean[None]])
    pad = 0.4
    ax.set_xlim(support[:, 0].min() - pad, support[:, 0].max() + pad)
    ax.set_ylim(shown[:, 1].min() - pad, shown[:, 1].max() + pad)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Sample paths and sample sensitivities")
    fig.tight_layout()
    return fig


def loss_vs_correlation(losses, corrs, steps, metric: str = "correlation") -> plt.Figure:
    """Paper Fig. 4: median similarity (``metric``) of learned against exact
    sensitivities, against the training loss, coloured by training step."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    sc = ax.scatter(losses, corrs, c=steps, cmap="viridis", s=18)
    losses = np.asarray(losses, dtype=float)
    if losses.size and np.nanmax(losses) > 10 * np.nanmin(losses):  # log only where it spans a decade
        ax.set_xscale("log")
    ax.set_xlabel("score-matching loss")
    ax.set_ylabel(f"median {metric}, learned vs exact")
    ax.grid(True, which="both", alpha=0.3)
    fig.colorbar(sc, ax=ax, label="training step")
    fig.tight_layout()
    return fig


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


SIGNED_CMAP = "RdBu_r"  # diverging: blue negative, white zero, red positive


def _show_image(ax, image) -> matplotlib.image.AxesImage:
    """One image [C, H, W] in [-1, 1] (greyscale when C = 1), clipped, without ticks."""
    image = np.clip((np.asarray(image, dtype=float) + 1) / 2, 0, 1)
    im = ax.imshow(image[0], cmap="gray", vmin=0, vmax=1) if image.shape[0] == 1 else \
        ax.imshow(image.transpose(1, 2, 0))
    _bare(ax)
    return im


def _show_signed(ax, values, cmap: str = SIGNED_CMAP) -> matplotlib.image.AxesImage:
    """One signed image [C, H, W] (the channel mean when C > 1) in a diverging colormap centred
    at zero, scaled symmetric by its own max |value| m (vmin=-m, vmax=m; m = 1 when all zero or
    non-finite), so that sign shows whatever the scale; m is written under it."""
    values = np.asarray(values, dtype=float)
    plane = values.mean(axis=0) if values.ndim == 3 else values
    finite = np.abs(plane[np.isfinite(plane)])
    m = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(plane, cmap=cmap, vmin=-m, vmax=m)
    _bare(ax)
    ax.set_xlabel(f"±{m:.1e}", fontsize=7, labelpad=1)
    return im


def _bare(ax) -> None:
    """No ticks or frame, but (unlike axis('off')) room for a y label: the row label."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _cell(images) -> float:
    """Inches a grid cell: larger for larger images."""
    return 1.1 if np.asarray(images).shape[-1] <= 32 else 1.4


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
    cell = _cell(base)
    fig, axes = plt.subplots(4, n, figsize=(cell * n + 0.3, 4 * cell + 0.6 + (0.3 if title else 0)), squeeze=False)
    for j in range(n):
        _show_image(axes[0, j], base[j])
        _show_image(axes[1, j], perturbed[j])
        _show_signed(axes[2, j], psi[j])
        _show_signed(axes[3, j], change[j])
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
    cell = _cell(samples)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(cell * n + 0.3, (1 + len(rows)) * (cell + 0.15) + 0.3),
                             squeeze=False)
    for j in range(n):
        _show_image(axes[0, j], samples[j])
        for i, (_, psi) in enumerate(rows, start=1):
            _show_signed(axes[i, j], psi[j])
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
    cell = _cell(samples)
    nrow, ncol = len(samples), len(coefficients)
    fig, axes = plt.subplots(nrow, ncol, figsize=(cell * ncol, cell * nrow + 0.3 + (0.3 if title else 0)),
                             squeeze=False)
    for i in range(nrow):
        for j, a in enumerate(coefficients):
            _show_image(axes[i, j], np.clip(samples[i] + a * psi[i], -1, 1))
    for ax, a in zip(axes[0], coefficients):
        ax.set_title(f"a = {a:g}", fontsize=9, fontweight="bold" if a == 0 else "normal")  # a = 0: the sample
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.3, w_pad=0.3)
    return fig


def ot_check_table(row_labels: list[str], col_labels: list[str], cells: list[list[str]], title: str,
                   note: str | None = None) -> plt.Figure:
    """Related paper's Table 3 as a figure: one row a (schedule / data set) cell, one column a
    measure (already formatted as text), and a ``note`` under it; the last column, a yes/no
    verdict, is shaded."""
    fig, ax = plt.subplots(figsize=(1.6 * len(col_labels) + 1.8, 0.3 * len(row_labels) + 0.8))
    ax.axis("off")
    colours = [["white"] * (len(col_labels) - 1) + ["#d9f0d3" if row[-1] == "yes" else "#f4cccc"] for row in cells]
    table = ax.table(cellText=cells, rowLabels=row_labels, colLabels=col_labels, cellColours=colours, loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.25)
    ax.set_title(title, fontsize=9)
    if note:
        fig.text(0.01, 0.0, note, fontsize=7, va="top", wrap=True)
    fig.tight_layout()
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
    cell, spacer = _cell(samples), 0.25  # spacer: a narrow empty column between groups, a low row between samples
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
        _show_image(ax, samples[m])
        ax.set_ylabel(f"sample {m}", fontsize=9)
        lower = []
        for key, first, label in (("top", first_top, top_label), ("bottom", first_bottom, bottom_label)):
            values = row.get(f"{key}_values")
            upper = []
            for j, n in enumerate(np.asarray(row[key], dtype=int)):
                ax = fig.add_subplot(grid[3 * m, first + j])
                _show_image(ax, train_images[n])
                if values is not None:
                    ax.set_title(f"{float(values[j]):.2g}", fontsize=7, pad=2)
                upper.append(ax)
            if m == 0 and upper:
                groups[label] = upper
            lower.extend((first + j, psi) for j, psi in enumerate(np.asarray(row[f"{key}_psi"], dtype=float)))
        for column, psi in lower:
            _show_signed(fig.add_subplot(grid[3 * m + 1, column]), psi)
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
    cell = _cell(x)
    fig = plt.figure(figsize=(4.8 + cell * len(amplitudes), max(3.8, cell * nrow + 0.6)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=(4.8, cell * len(amplitudes)))
    _singular_spectrum(left.subplots(), singular_values, frobenius_sq)
    axes = right.subplots(nrow, len(amplitudes), squeeze=False)
    for i in range(nrow):
        for j, a in enumerate(amplitudes):
            _show_image(axes[i, j], np.clip(x + a * vectors[i], -1, 1))
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
    cell = _cell(samples)
    nrow = len(samples)
    fig, axes = plt.subplots(nrow, 1 + k, figsize=(cell * (1 + k) + 0.3, nrow * (cell + 0.15) + 0.3), squeeze=False)
    for m in range(nrow):
        _show_image(axes[m, 0], samples[m])
        axes[m, 0].set_ylabel(f"sample {m}", fontsize=9)
        for i in range(k):
            _show_signed(axes[m, 1 + i], vectors[m, i])
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


def _rows_canvas(rows: list[list[np.ndarray]], gap_after: int) -> np.ndarray:
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


def _canvas_panels(canvases: list[np.ndarray], labels: list[str], titles: list[str], columns: int) -> plt.Figure:
    """One panel per canvas of ``_rows_canvas`` (``labels``: its rows), stacked."""
    fig, axes = plt.subplots(len(canvases), 1, squeeze=False,
                             figsize=(0.45 * (columns + 0.5) + 1.2, (0.45 * len(labels) + 0.4) * len(canvases)))
    for ax, canvas, title in zip(axes[:, 0], canvases, titles, strict=True):
        _show_image(ax, canvas)
        h = canvas.shape[1] / len(labels)
        ax.set_yticks([(r + 0.5) * h for r in range(len(labels))], labels, fontsize=7)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def attribution_tops(samples, train_images, tops: dict[str, np.ndarray]) -> plt.Figure:
    """Each method's top training images side by side for the same model samples: a panel
    a sample, a row a method (``tops[name]`` [M, k] image indices, most influential first),
    the sample itself at the left of every row."""
    samples, train_images = np.asarray(samples, dtype=float), np.asarray(train_images, dtype=float)
    names = list(tops)
    k = max(v.shape[1] for v in tops.values())
    canvases = [_rows_canvas([[samples[m], *(train_images[int(n)] for n in tops[name][m][:k])] for name in names], 1)
                for m in range(len(samples))]
    return _canvas_panels(canvases, names, [f"sample {m}: top {k} per method" for m in range(len(samples))], 1 + k)


def removal_examples(names: list[str], k: int, base, retrained, removed) -> plt.Figure:
    """What each ranking's removal does to a few queries: a panel a query, a row a ranking:
    the query (the full-data model's sample), its sample retrained without the ranking's
    top ``k`` (``retrained`` [Q, rankings, *event]), then the first of those removed
    images (``removed`` [Q, rankings, shown, *event])."""
    base, retrained, removed = (np.asarray(a, dtype=float) for a in (base, retrained, removed))
    canvases = [_rows_canvas([[base[q], retrained[q, r], *removed[q, r]] for r in range(len(names))], 2)
                for q in range(len(base))]
    titles = [f"query {q}: sample, retrained without the top {k}, the first {removed.shape[2]} removed"
              for q in range(len(base))]
    return _canvas_panels(canvases, names, titles, 2 + removed.shape[2])


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


RANKING_COLOURS = {"ours": "C0", "l2": "C1", "random": "C7", "least": "C2", "ours_exact": "C9",
                   "ours_clamped": "C4", "ours_set": "C5", "ours_loss": "C6", "feature": "C8", "dtrak": "C3"}


def counterfactual(names: list[str], ks: list[int], change, floor, removal: dict) -> plt.Figure:
    """How far model samples move when each ranking's top k training images are removed
    and the model retrained: ``change`` [Q, rankings, ks] of |Delta x| / |x|, pooled
    (bars: the medians over queries with their 95% intervals from ``removal[name][f"k{k}"]``,
    one dot per query) and per query at the largest k, against the noise floor ``floor``
    [Q] (the full data, other training seeds)."""
    change = np.moveaxis(np.asarray(change, dtype=float), 0, -1)  # [rankings, ks, Q]
    floor = np.asarray(floor, dtype=float)
    fig, (pooled, per_sample) = plt.subplots(1, 2, figsize=(11 + 0.15 * len(floor), 4), width_ratios=[1, 1.6])
    width = 0.8 / len(names)
    rng = np.random.default_rng(0)
    for r, name in enumerate(names):
        x = np.arange(len(ks)) + (r - (len(names) - 1) / 2) * width
        rows = [removal[name][f"k{k}"] for k in ks]
        med = np.array([row["median_change"] for row in rows])
        whiskers = np.clip([med - [row["ci_low"] for row in rows], [row["ci_high"] for row in rows] - med], 0, None)
        colour = RANKING_COLOURS[name]
        pooled.bar(x, med, width, yerr=whiskers, color=colour, alpha=0.8, label=name, capsize=2)
        for j in range(len(ks)):
            pooled.scatter(x[j] + rng.uniform(-width / 4, width / 4, change.shape[2]), change[r, j], s=6, c="k",
                           zorder=3)
        positions = np.arange(change.shape[2]) + (r - (len(names) - 1) / 2) * width
        per_sample.bar(positions, change[r, -1], width, color=colour, alpha=0.8, label=name)
    for ax in (pooled, per_sample):
        ax.set_ylabel("|Δx| / |x|")
    pooled.axhline(np.median(floor), color="r", ls="--", lw=1)
    pooled.set_xticks(range(len(ks)), [f"k = {k}" for k in ks])
    pooled.set_title("median over queries, 95% interval (dashed: median noise floor)", fontsize=10)
    per_sample.scatter(range(len(floor)), floor, marker="_", s=200, c="r", zorder=3, label="noise floor")
    per_sample.set_xticks(range(change.shape[2]))
    per_sample.set_xlabel("query (model sample)")
    per_sample.set_title(f"per query, k = {ks[-1]}")
    per_sample.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


DATAMODEL_LABELS = {"ours": "ours, removed-only weights", "ours_measure": "ours, whole-measure weights",
                    "l2kernel": "L2 kernel"}


def datamodeling(corr: dict[str, np.ndarray], norms: dict[str, np.ndarray], lds: dict[str, np.ndarray]) -> plt.Figure:
    """Linear datamodeling over random subsets: the correlation of predicted and actual
    Delta x per (sample, subset) for each prediction (``corr`` [M, J] by name: ours with
    each kind of removal weights, the L2-kernel baseline), and predicted against actual
    |Delta x| (``norms`` [M, J] by name, and ``actual``), one colour per model sample,
    with each prediction's median LDS (``lds`` [M])."""
    names = list(corr)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.3 * (1 + len(names)), 4))
    bins = np.linspace(-1, 1, 21)
    for c, name in enumerate(names):
        values = np.asarray(corr[name], dtype=float).ravel()
        axes[0].hist(values[np.isfinite(values)], bins=bins, alpha=0.5, color=f"C{c}",
                     label=f"{DATAMODEL_LABELS.get(name, name)}: median {np.nanmedian(values):.2f}")
    axes[0].set_xlabel("corr(predicted Δx, actual Δx)")
    axes[0].set_ylabel("(sample, subset) pairs")
    axes[0].legend(fontsize=7)
    actual = np.asarray(norms["actual"], dtype=float)
    for ax, name in zip(axes[1:], names, strict=True):
        predicted = np.asarray(norms[name], dtype=float)
        for m in range(len(actual)):
            ax.scatter(predicted[m], actual[m], s=10, color=f"C{m % 10}")
        ax.set_xlabel(f"predicted |Δx|: {DATAMODEL_LABELS.get(name, name)}")
        ax.set_ylabel("actual |Δx|")
        ax.set_title(f"LDS (median Spearman over subsets) {np.nanmedian(lds[name]):.2f}", fontsize=10)
    fig.tight_layout()
    return fig


LDS_TITLES = {"loss": "output: the query's denoising loss", "sample": "output: how far the query sample moves"}


def lds_intervals(scores: dict[str, dict[str, dict]]) -> plt.Figure:
    """The linear datamodeling score of each method, a panel per output (``scores[output]
    [method]`` with ``mean``, ``ci_low``, ``ci_high``): the mean Spearman over queries and
    its 95% bootstrap interval over queries and subsets; zero (no better than chance) dashed."""
    outputs = list(scores)
    fig, axes = plt.subplots(1, len(outputs), figsize=(5 * len(outputs), 0.45 * max(map(len, scores.values())) + 1.5),
                             squeeze=False)
    for ax, output in zip(axes[0], outputs, strict=True):
        names = list(scores[output])
        mean = np.array([scores[output][n]["mean"] for n in names], dtype=float)
        low = np.array([scores[output][n]["ci_low"] for n in names], dtype=float)
        high = np.array([scores[output][n]["ci_high"] for n in names], dtype=float)
        y = np.arange(len(names))[::-1]
        # a percentile interval need not contain the mean: clip, never a negative bar
        ax.errorbar(mean, y, xerr=np.clip([mean - low, high - mean], 0, None), fmt="o", capsize=3)
        ax.axvline(0, color="k", ls="--", lw=0.8)
        ax.set_yticks(y, names)
        ax.set_xlabel("LDS (mean Spearman over subsets, 95% interval)")
        first = next(iter(scores[output].values()))
        ax.set_title(f"{LDS_TITLES.get(output, output)}\n{first['queries']} queries, {first['subsets']} subsets",
                     fontsize=10)
    fig.tight_layout()
    return fig
