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
            ax.loglog(etas, arrays["remainder_over_eta"], style, marker="o", ms=3, label=label)
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
        norm = np.linalg.norm(g, axis=1)
        direction = g / np.maximum(norm, 1e-300)[:, None]
        ax.scatter(support[:, 0], support[:, 1], s=2, c="0.3", label=r"supp $\rho$")
        q = ax.quiver(grid[:, 0], grid[:, 1], direction[:, 0], direction[:, 1], np.log10(norm + 1e-300),
                      cmap="viridis", angles="xy", scale=30, width=0.004)
        ax.plot(*nu_mean, marker="*", ms=14, c="crimson", ls="", label=r"$\nu$ mean")
        ax.set_title(f"$g_t$ at t = {t:g}")
        ax.set_aspect("equal")
        fig.colorbar(q, ax=ax, fraction=0.046, label=r"$\log_{10} |g_t|$")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


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
    ax.plot(*nu_mean, marker="*", ms=14, c="crimson", ls="")
    pad = 0.4
    ax.set_xlim(support[:, 0].min() - pad, support[:, 0].max() + pad)
    ax.set_ylim(min(support[:, 1].min(), nu_mean[1]) - pad, max(support[:, 1].max(), nu_mean[1]) + pad)
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
