"""Intervals and paired tests for comparing methods on a finite number of query samples
(docs/attribution.md: "Do the scores hold up when the data change?"): enough to say when
two methods cannot be told apart, instead of a median of a handful.

- ``bootstrap_interval``: a percentile bootstrap interval of any statistic of one sample;
  ``bootstrap_difference``: of the difference of a statistic between two independent samples;
  ``spearman_interval``, ``spearman_difference``: of a rank correlation over paired values, and of
  the difference between two predictors' correlations with the same values.
- ``lds``: the linear datamodeling score (mean over queries of the Spearman correlation
  over subsets of predicted and actual outputs) with a two-way bootstrap interval that
  resamples queries and subsets together (both are random draws: the subsets are shared
  by all queries, so resampling queries alone would understate the uncertainty).
- ``paired``: per query, does A beat B? The win rate and an exact two-sided sign test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import binomtest

from diffsens_cli.core.compare import spearman_rows

LEVEL = 0.95
RESAMPLES = 2000


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap values (NaN ones dropped; NaN when none is left)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], float] = np.median,
                       resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, float]:
    """``statistic`` of ``values`` [n] and its percentile bootstrap interval (``ci_low``,
    ``ci_high``; NaN values dropped first)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
    stats = np.array([statistic(d) for d in draws])
    low, high = percentile_interval(stats, level)
    return {"value": float(statistic(values)), "ci_low": low, "ci_high": high, "n": len(values)}


def bootstrap_difference(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                         resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, float]:
    """``statistic(a) - statistic(b)`` of two independent samples and its percentile bootstrap
    interval, each sample resampled on its own (NaN values dropped first)."""
    a, b = (np.asarray(x, dtype=float) for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(a[rng.integers(0, len(a), len(a))]) - statistic(b[rng.integers(0, len(b), len(b))])
                      for _ in range(resamples)])
    low, high = percentile_interval(stats, level)
    return {"value": float(statistic(a) - statistic(b)), "ci_low": low, "ci_high": high}


def spearman_interval(x: np.ndarray, y: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict[str, float]:
    """Spearman's correlation of paired values ``x``, ``y`` [n] and its percentile bootstrap
    interval, the pairs resampled together (NaN for a constant side)."""
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    low, high = percentile_interval(spearman_rows(x[idx], y[idx]), level)
    return {"value": float(spearman_rows(x[None], y[None])[0]), "ci_low": low, "ci_high": high}


def spearman_difference(a: np.ndarray, b: np.ndarray, y: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL) -> dict[str, float]:
    """Spearman(a, y) - Spearman(b, y) of two predictors of the same ``y`` [n], with a paired
    bootstrap interval (the same resampled items for both)."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))
    low, high = percentile_interval(spearman_rows(a[idx], y[idx]) - spearman_rows(b[idx], y[idx]), level)
    value = spearman_rows(a[None], y[None])[0] - spearman_rows(b[None], y[None])[0]
    return {"value": float(value), "ci_low": low, "ci_high": high}


def _finite_mean(values: np.ndarray) -> float:
    """The mean of the finite values; NaN when none is (a draw of few subsets can repeat
    one subset only, leaving no rank correlation)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def lds(predicted: np.ndarray, actual: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
        level: float = LEVEL) -> dict[str, float | list[float]]:
    """The LDS of predicted outputs [M, J] (M queries, J subsets) against actual ones: the
    mean over queries of the Spearman correlation over subsets, its per-query values, and
    a bootstrap interval drawing queries and subsets with replacement together (a drawn
    subset's ties keep their order, so a repeated subset counts twice)."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    per_query = spearman_rows(predicted, actual)
    m_count, j_count = predicted.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for b in range(resamples):
        q = rng.integers(0, m_count, m_count)
        s = rng.integers(0, j_count, j_count)
        stats[b] = _finite_mean(spearman_rows(predicted[np.ix_(q, s)], actual[np.ix_(q, s)]))
    low, high = percentile_interval(stats, level)
    return {"mean": _finite_mean(per_query), "ci_low": low, "ci_high": high,
            "per_query": per_query.tolist(), "queries": m_count, "subsets": j_count}


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test's p-value for ``wins`` against ``losses`` (ties
    dropped before): how surprising the split is if either side were as likely to win."""
    total = wins + losses
    return 1.0 if total == 0 else float(binomtest(wins, total, 0.5).pvalue)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Per query, is ``a`` larger than ``b``? The share of queries where it is (ties count
    half), the sign test's p-value, and the counts (queries with a NaN dropped)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    wins, losses = int((a[keep] > b[keep]).sum()), int((a[keep] < b[keep]).sum())
    n = int(keep.sum())
    ties = n - wins - losses
    return {"win_rate": (wins + ties / 2) / n if n else float("nan"), "p_value": sign_test(wins, losses),
            "wins": wins, "losses": losses, "ties": ties}
