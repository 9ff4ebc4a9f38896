"""Figures of the synthetic experiments: paper Figs. 1-4 (toy2d, first_order, score_error) and
the related paper's Table 3 (fisher_ot)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

PANEL_TITLES = {"ode": "PF-ODE, forward Euler", "sde": "SDE, Euler-Maruyama", "hutchinson": "Hutchinson (ODE)"}


def remainder_panels(etas, curves) -> plt.Figure:
    """Paper Fig. 3: median |R(eta)|/eta against eta, log-log, one panel a study."""
    panels = list(dict.fromkeys(p for p, _, _ in curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        positive = False
        for p, label, arrays in curves:
            if p != panel:
                continue
            style = "--" if label == "exact density" else ":" if "rademacher" in label else "-"
            r = np.asarray(arrays["remainder_over_eta"], dtype=float)
            positive |= bool((r > 0).any())
            ax.plot(etas, np.where(r > 0, r, np.nan), style, marker="o", ms=3, label=label)  # log axes: > 0 only
        ax.set_xscale("log")
        if positive:
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


def text_table(row_labels: list[str], col_labels: list[str], cells: list[list[str]], title: str,
               note: str | None = None, verdict: bool = True) -> plt.Figure:
    """A table as a figure (the diffusion-Fisher paper's Tables 2 and 3, the predicted costs):
    one row a cell of the study, one column a measure (already formatted as text), and a
    ``note`` under it; with ``verdict``, the last column, a yes/no verdict, is shaded."""
    fig, ax = plt.subplots(figsize=(1.6 * len(col_labels) + 1.8, 0.3 * len(row_labels) + 0.8))
    ax.axis("off")
    colours = [["white"] * (len(col_labels) - 1) + ["#d9f0d3" if row[-1] == "yes" else "#f4cccc"] for row in cells]
    if not verdict:
        colours = [["white"] * len(col_labels) for _ in cells]
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
