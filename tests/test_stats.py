"""The intervals and paired tests methods are compared with, against exact answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffsens_cli.core.compare import linear_fit, spearman, spearman_rows
from diffsens_cli.core.stats import bootstrap_interval, lds, paired, sign_test, spearman_difference, spearman_interval


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    # 9 wins of 10: P(X <= 1) + P(X >= 9) under Binomial(10, 1/2) = 2 * 11 / 1024
    assert math.isclose(sign_test(9, 1), 22 / 1024, rel_tol=1e-12)
    assert math.isclose(sign_test(1, 9), 22 / 1024, rel_tol=1e-12)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0


def test_paired_counts_ties_half_and_drops_undefined_queries():
    a = np.array([3.0, 2.0, 1.0, 5.0, np.nan])
    b = np.array([1.0, 2.0, 4.0, 0.0, 1.0])
    out = paired(a, b)
    assert (out["wins"], out["losses"], out["ties"]) == (2, 1, 1)
    assert out["win_rate"] == 2.5 / 4
    assert math.isclose(out["p_value"], sign_test(2, 1))


def test_spearman_rows_equal_scipys_spearman_with_ties():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(5, 12)), g.integers(0, 4, size=(5, 12)).astype(float)  # y has ties
    y[2] = x[2] ** 3  # monotone: 1
    expected = [spearmanr(x[m], y[m]).statistic for m in range(5)]
    np.testing.assert_allclose(spearman_rows(x, y), expected, atol=1e-12)
    assert math.isclose(spearman_rows(x, y)[2], 1.0)
    assert float(spearman(torch.from_numpy(x[0]), torch.from_numpy(y[0]))) == pytest.approx(expected[0])


def test_lds_of_monotone_predictions_is_one_with_a_degenerate_interval_and_reversed_minus_one():
    g = np.random.default_rng(1)
    actual = g.normal(size=(6, 10))
    out = lds(np.exp(actual), actual, resamples=200)
    np.testing.assert_allclose([out["mean"], out["ci_low"], out["ci_high"]], 1.0, rtol=0, atol=1e-12)  # rounding
    assert math.isclose(lds(-actual, actual, resamples=50)["mean"], -1.0)


def test_lds_interval_covers_the_population_value_and_narrows_with_more_queries_and_subsets():
    """Predicted = actual + noise of the same spread: the Spearman correlation of a
    bivariate normal with rho = 1/sqrt(2) is (6/pi) asin(rho/2) = 0.6972."""
    truth = 6 / np.pi * np.arcsin(1 / np.sqrt(2) / 2)
    widths = []
    for m, j in ((8, 16), (32, 64)):
        g = np.random.default_rng(2)
        actual = g.normal(size=(m, j))
        out = lds(actual + g.normal(size=(m, j)), actual, resamples=500, seed=3)
        assert out["ci_low"] < truth < out["ci_high"], out
        widths.append(out["ci_high"] - out["ci_low"])
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory_interval():
    values = np.random.default_rng(4).normal(2.0, 3.0, size=400)
    out = bootstrap_interval(values, np.mean, resamples=4000, seed=5)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert math.isclose(out["value"], values.mean())
    assert abs(out["ci_low"] - (values.mean() - half)) < 0.1 * half
    assert abs(out["ci_high"] - (values.mean() + half)) < 0.1 * half
    assert bootstrap_interval(np.array([np.nan]))["n"] == 0


def test_spearman_interval_and_paired_difference():
    """Rank correlation over pairs with its interval: 1 (and a degenerate interval) for a
    monotone map, NaN for a constant side; a predictor with noise added ranks worse than the
    clean one, by an interval that excludes 0 and contains the value."""
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 2, 200)
    assert spearman_interval(y**3, y, 200, 0) == pytest.approx({"value": 1.0, "ci_low": 1.0, "ci_high": 1.0},
                                                               abs=1e-12)
    assert np.isnan(spearman_interval(np.ones(200), y, 200, 0)["value"])
    diff = spearman_difference(y, y + rng.normal(0, 0.3, 200), y, 200, 0)
    assert 0 < diff["ci_low"] <= diff["value"] <= diff["ci_high"]


def test_linear_fit_equals_numpys_least_squares_and_squared_correlation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40))
    y = 0.7 * x + rng.normal(scale=[[0.1], [1.0], [5.0]], size=(3, 40)) + 2.0
    slope, intercept, r2 = linear_fit(torch.from_numpy(x), torch.from_numpy(y))
    for i in range(3):
        fit_slope, fit_intercept = np.polyfit(x[i], y[i], 1)
        assert math.isclose(slope[i], fit_slope, rel_tol=1e-10) and math.isclose(intercept[i], fit_intercept,
                                                                                   rel_tol=1e-10)
        assert math.isclose(r2[i], np.corrcoef(x[i], y[i])[0, 1] ** 2, rel_tol=1e-10)
    assert r2[0] > 0.95 and r2[2] < 0.2  # the three noise levels span the range

