"""Figures of the related paper "Generalization through variance" (GtV): the proxy score's noise
share over the plane (Fig. 1), the naive sampler against a kernel density (Fig. 2), and how its
spread scales."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

TRAINING = "crimson"
NAIVE = "tab:green"
KDE = "tab:blue"
PF_ODE = "0.35"


def variance_share_maps(share, axis, levels, sets) -> plt.Figure:
    """GtV Fig. 1: ``tr C / (tr C + |s|^2)`` per set (rows) and noise level (columns)."""
    names = list(sets)
    fig, axes = plt.subplots(len(names), len(levels), figsize=(2.6 * len(levels) + 0.8, 2.5 * len(names)),
                             squeeze=False)
    extent = (axis[0], axis[-1], axis[0], axis[-1])
    for i, name in enumerate(names):
        points = np.asarray(sets[name])
        for j, level in enumerate(levels):
            ax = axes[i][j]
            # grid row a*G + b is (axis[a], axis[b]): x runs down the rows, so transpose for imshow
            im = ax.imshow(np.asarray(share[i][j]).T, origin="lower", extent=extent, cmap="magma", vmin=0, vmax=1)
            ax.scatter(points[:, 0], points[:, 1], s=10, c=TRAINING, edgecolors="white", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(rf"$\sigma/\alpha$ = {level:g}")
            if j == 0:
                ax.set_ylabel(name)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label=r"tr $C$ / (tr $C$ + $|s|^2$)")
    return fig


def naive_against_kde(arrays, names, draws, steps) -> plt.Figure:
    """GtV Fig. 2: per set, the naive sampler's samples (green), the forward-Euler PF-ODE's on the
    same grid from the same starts (grey), and those of a kernel density estimate matched to the
    naive sampler's spread (blue), around the training points (red)."""
    rows = (("naive", NAIVE, f"naive sampler, R = {draws}"), ("pf_ode", PF_ODE, f"PF-ODE, Euler, {steps} steps"),
            ("kde", KDE, "KDE, matched spread"))
    fig, axes = plt.subplots(len(rows), len(names), figsize=(3.2 * len(names), 3.2 * len(rows)), squeeze=False)
    for j, name in enumerate(names):
        points = np.asarray(arrays[f"{name}/points"])
        pad = 0.35 * max(np.ptp(points[:, 0]), np.ptp(points[:, 1]), 1.0)
        for i, (key, colour, label) in enumerate(rows):
            ax = axes[i][j]
            x = np.asarray(arrays[f"{name}/{key}"])
            ax.scatter(x[:, 0], x[:, 1], s=1.5, c=colour, alpha=0.35, linewidths=0, rasterized=True)
            ax.scatter(points[:, 0], points[:, 1], s=14, c=TRAINING, edgecolors="white", linewidths=0.5)
            ax.set_xlim(points[:, 0].min() - pad, points[:, 0].max() + pad)
            ax.set_ylim(points[:, 1].min() - pad, points[:, 1].max() + pad)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(label)
    fig.tight_layout()
    return fig


def naive_scaling(metrics, draws, steps) -> plt.Figure:
    """The naive sampler's departure from the PF-ODE from the same starts: median squared
    deviation of the paths that end at the same point (top) and the share that switch point
    (bottom), against R at a fixed grid (left) and against the number of steps at fixed R (right)."""
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.4), squeeze=False)
    for j, (label, title) in enumerate((("draws", f"R (posterior draws per step; {steps} steps)"),
                                        ("steps", f"steps (R = {draws})"))):
        for name, row in metrics.items():
            sweep = row[f"by_{label}"]
            x = np.asarray(sweep["x"], dtype=float)
            line, = axes[0][j].plot(x, sweep["deviation_median"], marker="o", ms=3,
                                    label=f"{name} (slope {sweep['slope_median']['value']:.2f})")
            axes[1][j].plot(x, sweep["switched"], marker="o", ms=3, c=line.get_color(), label=name)
        x = np.asarray(next(iter(metrics.values()))[f"by_{label}"]["x"], dtype=float)
        first = np.nanmax([row[f"by_{label}"]["deviation_median"][0] for row in metrics.values()])
        axes[0][j].plot(x, first * x[0] / x, "k--", lw=0.8, label="slope -1")
        for i in range(2):
            axes[i][j].set_xscale("log")
            axes[i][j].grid(True, which="both", alpha=0.3)
            axes[i][j].set_xlabel(title)
        axes[0][j].set_yscale("log")
        axes[0][j].legend(fontsize=7)
    axes[0][0].set_ylabel(r"median $|x_{naive} - x_{ode}|^2$ (same point)")
    axes[1][0].set_ylabel("share of paths ending at another point")
    fig.tight_layout()
    return fig


def variance_prediction(arrays, names, draws) -> plt.Figure:
    """Predicted against empirical tr Cov of the naive sampler's end points, one dot per start,
    per set (columns) and R (colours); starts whose repeats switch point are open circles."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        per_draw = np.asarray(arrays[f"{name}/predicted_per_draw"])
        base = np.trace(per_draw, axis1=-2, axis2=-1)
        for r in draws:
            emp = np.trace(np.asarray(arrays[f"{name}/R{r}/empirical"]), axis1=-2, axis2=-1)
            pred = base / r
            switching = np.asarray(arrays[f"{name}/R{r}/switching"], dtype=bool)
            dots = ax.scatter(pred[~switching], emp[~switching], s=8, label=f"R = {r}")
            ax.scatter(pred[switching], emp[switching], s=14, facecolors="none", edgecolors=dots.get_facecolor())
        low = min(ax.get_xlim()[0], ax.get_ylim()[0])
        high = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("predicted tr Cov (adjoint)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("empirical tr Cov (naive repeats)")
    axes[0][0].legend(fontsize=7, title="open: repeats switch point", title_fontsize=7)
    fig.tight_layout()
    return fig


def learned_spread(arrays, names) -> plt.Figure:
    """Learned models: the spread of their samples from each start against the adjoint's
    prediction and two baselines (log-log; their Spearman correlations are in summary.json)."""
    keys = (("predicted", "adjoint prediction"), ("unpropagated", "C without the flow"),
            ("end_distance", "distance to nearest point"))
    fig, axes = plt.subplots(len(names), len(keys), figsize=(3.4 * len(keys), 3.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        spread = np.asarray(arrays[f"{name}/learned/spread"])
        for j, (key, label) in enumerate(keys):
            ax = axes[i][j]
            ax.scatter(np.asarray(arrays[f"{name}/learned/{key}"]), spread, s=8, c=NAIVE)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow decade labels its minor ticks on top of each other
            ax.set_xlabel(label)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{name}: spread over models")
    fig.tight_layout()
    return fig
