"""Figures of the attribution evaluation (counterfactual): removals, datamodeling, LDS."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from diffsens_cli.plots.common import canvas_panels, rows_canvas


def removal_examples(names: list[str], k: int, base, retrained, removed) -> plt.Figure:
    """What each ranking's removal does to a few queries: a panel a query, a row a ranking:
    the query (the full-data model's sample), its sample retrained without the ranking's
    top ``k`` (``retrained`` [Q, rankings, *event]), then the first of those removed
    images (``removed`` [Q, rankings, shown, *event])."""
    base, retrained, removed = (np.asarray(a, dtype=float) for a in (base, retrained, removed))
    canvases = [rows_canvas([[base[q], retrained[q, r], *removed[q, r]] for r in range(len(names))], 2)
                for q in range(len(base))]
    titles = [f"query {q}: sample, retrained without the top {k}, the first {removed.shape[2]} removed"
              for q in range(len(base))]
    return canvas_panels(canvases, names, titles, 2 + removed.shape[2])


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
