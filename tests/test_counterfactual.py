"""Counterfactual removal and datamodeling (issue 12): the predicted change of a model
sample against the exact change of the exact score model, the batch draws retrainings
share, the L2-kernel baseline by hand, the experiment end to end on the closed-form model
(where retraining is exact), reuse of retrainings by content, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import run_tiny, solver_settings_with
from scipy.stats import spearmanr

from diffsens_cli.core.attribution import denoising_loss
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.compare import spearman_rows
from diffsens_cli.core.counterfactual import (
    datamodel_predictions,
    kernel_removal_prediction,
    random_halves,
    removal_mix,
    top_k_mask,
    variance_above_floor,
)
from diffsens_cli.core.forcing import EmpiricalForcing
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.core.trak import output_pairs
from diffsens_cli.training.source import SharedDraws

SETTINGS = solver_settings_with(step_size=5e-3, density="closed_form", progress=False)


def _points_and_z0(n: int = 40, d: int = 3, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(n, d, generator=g, dtype=torch.float64)
    z0 = torch.randn(b, d, generator=g, dtype=torch.float64)
    return points, z0


def _exact_sample(points: torch.Tensor, weights: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """The sample from ``z0`` of the exact score of the weighted empirical measure."""
    model = MixtureScore(GaussianMixture(points, torch.zeros(len(points), dtype=points.dtype), weights), VPLinear())
    return Integrator(model, SETTINGS).run(z0).samples


def test_removal_weights_put_minus_one_over_the_kept_count_on_the_removed_images():
    removed = torch.tensor([[True, False, False, False], [True, True, False, False]])
    mix = removal_mix(removed)
    np.testing.assert_array_equal(mix.numpy(), [[-1 / 3, 0, 0, 0], [-1 / 2, -1 / 2, 0, 0]])
    # the predicted change -(k / (N - k)) mean_R psi: total weight -k / (N - k)
    np.testing.assert_allclose(mix.sum(1).numpy(), [-1 / 3, -1.0])
    # the whole measure's change: -1/N on the removed, 1/(N - k) - 1/N on the kept, summing to 0
    measure = removal_mix(removed, "measure")
    np.testing.assert_allclose(measure.numpy(), [[-1 / 4, 1 / 12, 1 / 12, 1 / 12], [-1 / 4, -1 / 4, 1 / 4, 1 / 4]])
    with pytest.raises(ValueError, match="every training image"):
        removal_mix(torch.ones(1, 4, dtype=torch.bool))


def test_predicted_change_is_the_derivative_along_the_removal_and_second_order_accurate():
    """Exact score of N = 40 points: the tangent with the removal weights is the derivative
    of the exact sample along the measure path ``rho + t (rho_kept - rho)`` (a finite
    difference at t = 1e-4 agrees to 1e-3), and the error of the linear prediction at t
    shrinks as t^2 (halving t quarters it). Without a clamp the sensitivities of all N
    points sum to zero, so both kinds of removal weights give the same tangent."""
    points, z0 = _points_and_z0()
    n = len(points)
    removed = torch.zeros(2, n, dtype=torch.bool)
    removed[0, :2] = True
    removed[1, 10:14] = True
    mix = torch.cat([removal_mix(removed), removal_mix(removed, "measure")])
    psi = Integrator(MixtureScore(GaussianMixture.empirical(points), VPLinear()), SETTINGS,
                     EmpiricalForcing(points, mix=mix[:, None].expand(-1, len(z0), -1))).run(z0).psi
    np.testing.assert_allclose(psi[:2].numpy(), psi[2:].numpy(), atol=1e-10)
    base = _exact_sample(points, torch.full((n,), 1 / n, dtype=torch.float64), z0)
    for r in range(2):
        kept = (~removed[r]).double() / (~removed[r]).sum()
        path = lambda t, r=r, kept=kept: _exact_sample(points, (1 - t) / n + t * kept, z0)  # noqa: E731
        t = 1e-4
        np.testing.assert_allclose(((path(t) - base) / t).numpy(), psi[r].numpy(), rtol=1e-3, atol=1e-5)
        errors = [(path(t) - base - t * psi[r]).norm() for t in (0.2, 0.1)]
        assert 3.0 < errors[0] / errors[1] < 5.0


def test_shared_draws_change_only_the_items_that_drew_a_removed_image():
    """With every image kept the draws are uniform positions; without some, the items
    that drew a kept position are the same, the others are redrawn among the kept; and
    the generator ends in the same state, so later draws (times, noise) stay shared."""
    points = torch.arange(20.0)[:, None]
    keep = torch.ones(20, dtype=torch.bool)
    fewer = keep.clone()
    fewer[[3, 7, 11]] = False
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full, reduced = SharedDraws(points, keep).sample(500, g1), SharedDraws(points, fewer).sample(500, g2)
    same = fewer[full[:, 0].long()]
    assert torch.equal(full[same], reduced[same]) and (~same).sum() > 0
    assert fewer[reduced[:, 0].long()].all()
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert 0.1 < (~same).double().mean() < 0.2  # about 3 in 20 of the items


def test_kernel_baseline_by_hand_and_random_halves_keep_their_earlier_subsets():
    x = torch.tensor([[0.0, 0.0]])
    points = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    removed = torch.tensor([[True, True, False]])
    w = torch.exp(-torch.tensor([1.0, 4.0, 9.0]) / 2)  # bandwidth 1
    expected = points[2] - (w[:, None] * points).sum(0) / w.sum()  # only x_2 is left
    np.testing.assert_allclose(kernel_removal_prediction(x, points, removed, 1.0)[0, 0].numpy(), expected.numpy())
    halves = random_halves(30, 0.5, 4, seed=2)
    assert (halves.sum(1) == 15).all()
    assert torch.equal(random_halves(30, 0.5, 6, seed=2)[:4], halves)
    assert not torch.equal(random_halves(30, 0.5, 4, seed=3), halves)
    assert torch.equal(top_k_mask(torch.tensor([2, 0, 1]), 2), torch.tensor([True, False, True]))


@pytest.mark.parametrize("bandwidth", [0.7, 0.03])
def test_kernel_baseline_for_several_removals_and_samples_equals_a_plain_loop(bandwidth):
    """Each removal r and sample m: the Gaussian-kernel mean of the kept points minus that of
    all points, one pair at a time in plain Python with the weights normalised by their
    largest log (at bandwidth 0.03 every far weight underflows in linear space, and removing
    every near point of sample 0 leaves only such far ones)."""
    g = torch.Generator().manual_seed(0)
    points, x = torch.randn(12, 3, generator=g).double(), torch.randn(4, 3, generator=g).double()
    removed = torch.rand(5, 12, generator=g) < 0.4
    removed[0] = torch.cdist(x[:1], points)[0] < 1.5  # every near point of sample 0
    got = kernel_removal_prediction(x, points, removed, bandwidth)

    def mean(m: int, keep: list[bool]) -> torch.Tensor:
        logs = [-float((x[m] - p).pow(2).sum()) / (2 * bandwidth**2) for p in points]
        top = max(lg for lg, k in zip(logs, keep) if k)
        w = [math.exp(lg - top) if k else 0.0 for lg, k in zip(logs, keep)]
        return sum(wi * p for wi, p in zip(w, points)) / sum(w)

    if bandwidth < 0.1:  # the case the log space is for: no kept weight survives exp() unnormalised
        assert max(math.exp(-float((x[0] - p).pow(2).sum()) / (2 * bandwidth**2))
                   for p, r in zip(points, removed[0]) if not r) == 0.0
    for r in range(5):
        for m in range(4):
            expected = mean(m, (~removed[r]).tolist()) - mean(m, [True] * 12)
            torch.testing.assert_close(got[r, m], expected, rtol=1e-9, atol=1e-12)


def _run(tmp_path, name: str, *overrides: str, experiment: str = "counterfactual_closed_form"):
    return run_tiny(tmp_path, name, experiment, *overrides)


def test_closed_form_experiment_predicts_removals_and_ranks_by_the_scores(shared_run):
    """N = 30 exact-score points, k = 3 and 6: the retrained model is exact, so there is
    no noise floor; removing our top images moves the samples, our bottom ones hardly,
    and there the prediction is exact (its error is second order); each ranking removes
    its own top k (ours: the largest scores, least: the smallest, l2: the nearest)."""
    out, summary = shared_run("counterfactual_closed_form")
    cf, dm = summary["metrics"]["counterfactual"], summary["metrics"]["datamodeling"]
    assert cf["noise_floor"] == 0 and cf["k"] == [3, 6] and cf["num_train"] == 30
    # far from the sample (random, our least), removals act in the linear regime
    for name in ("random", "least"):
        assert cf[name]["k3"]["median_corr_pred"] > 0.99, (name, cf[name])
    assert cf["ours"]["k6"]["median_change"] > 100 * cf["least"]["k6"]["median_change"]
    with np.load(out / "arrays.npz") as a:
        scores, l2, removed = a["influence/scores"], a["influence/l2"], a["counterfactual/removed"]
        columns = list(a["counterfactual/columns"])
        assert columns == ["ours", "l2", "random", "random:1", "random:2", "least"]
        for m in range(2):
            orders = (np.argsort(-scores[m]), np.argsort(l2[m]), None, None, None, np.argsort(scores[m]))
            for c, order in enumerate(orders):
                for j, k in enumerate((3, 6)):
                    assert removed[m, c, j].sum() == k
                    if order is not None:
                        assert set(np.flatnonzero(removed[m, c, j])) == set(order[:k])
        np.testing.assert_array_equal(removed[0, 2:5], removed[1, 2:5])  # the random orders are every sample's
        assert len({removed[0, c, 1].tobytes() for c in (2, 3, 4)}) == 3  # and three different ones
        # random's result per query is the mean over its seeds; the others are their one column
        per_column, change = a["counterfactual/change_per_column"], a["counterfactual/change"]
        np.testing.assert_allclose(change[:, 2], per_column[:, 2:5].mean(1))
        np.testing.assert_array_equal(change[:, [0, 1, 3]], per_column[:, [0, 1, 5]])
        assert cf["random"]["k6"]["median_change"] == pytest.approx(float(np.median(change[:, 2, 1])))
        assert a["datamodel/removed"].shape == (3, 30) and (a["datamodel/removed"].sum(1) == 15).all()
        # the predictions are the forward tangents of removal_mix along each sample's path
        subsets = torch.from_numpy(a["datamodel/removed"])
        model = MixtureScore(GaussianMixture.empirical(torch.from_numpy(a["train_points"])), VPLinear())
        z0 = torch.from_numpy(a["z0"])
        mix = removal_mix(subsets)[:, None].expand(-1, len(z0), -1)
        settings = solver_settings_with(step_size=0.02, density="closed_form", progress=False)
        psi = Integrator(model, settings, EmpiricalForcing(model.measure.means, mix=mix)).run(z0).psi
        np.testing.assert_allclose(a["datamodel/predicted"][0], psi.transpose(0, 1).numpy(), rtol=1e-6, atol=1e-12)
        # the LDS by hand: per sample, scipy's Spearman over subsets of |predicted| and |actual| moves
        moved = np.linalg.norm((a["datamodel/retrained"] - a["base"][:, None]).reshape(2, 3, -1), axis=2)
        predicted = np.linalg.norm(a["datamodel/predicted"][0].reshape(2, 3, -1), axis=2)
        per_sample = [spearmanr(predicted[m], moved[m]).statistic for m in range(2)]
    assert dm["subsets"] == 3 and dm["lds_per_sample"] == pytest.approx(per_sample)
    assert dm["lds"] == pytest.approx(np.median(per_sample))
    # no clamp, exact score: the two kinds of removal weights agree
    assert cf["ours"]["k3"]["median_corr_pred_measure"] == pytest.approx(cf["ours"]["k3"]["median_corr_pred"])


def test_more_subsets_train_only_the_new_ones(tmp_path):
    """Retrainings are stages keyed by the removed images: a rerun with one more subset
    trains one more model and reuses every other (their files untouched)."""
    args = ["counterfactual.rankings=[ours,random]", "counterfactual.remove=[4]", "counterfactual.random_seeds=1",
            "influence.attributions=[ours_exact,ours_clamped,l2]"]
    out, _ = _run(tmp_path, "a", *args, experiment="digits_counterfactual")
    assert (out / "fig_removal_examples.png").stat().st_size > 0  # smoke: image data draw the removed images
    trained = sorted(tmp_path.glob("outputs/stages/train_counterfactual/*/model/*"))
    with np.load(out / "arrays.npz") as a:
        sets = {r.tobytes() for r in a["counterfactual/removed"].reshape(-1, a["datamodel/removed"].shape[1])}
        sets |= {r.tobytes() for r in a["datamodel/removed"]}
    models = {p.parent for p in trained}
    assert len(models) == len(sets) + 3  # every removal set once, the reference and two noise-floor seeds
    mtimes = {p: p.stat().st_mtime_ns for p in trained}
    _run(tmp_path, "b", *args, "datamodel.subsets=4", experiment="digits_counterfactual")
    after = {p.parent for p in tmp_path.glob("outputs/stages/train_counterfactual/*/model/*")}
    assert len(after) == len(models) + 1
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_datamodel_predictions_sum_the_removed_scores_and_the_floor_share_is_one_minus_a_variance_ratio():
    scores = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.5, 3.0]])
    removed = torch.tensor([[True, False, True], [False, True, False]])
    np.testing.assert_allclose(datamodel_predictions(scores, removed).numpy(), [[5.0, 2.0], [2.0, 0.5]])
    outputs = torch.tensor([[1.0, 3.0, 5.0], [0.0, 1.0, 2.0]])  # variances over subsets 4 and 1
    floor = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # over seeds: 1 and 0
    np.testing.assert_allclose(variance_above_floor(outputs, floor).numpy(), [0.75, 1.0])


def test_the_lds_scores_each_method_on_the_exact_retrained_loss_and_move(shared_run):
    """On the closed-form model the retrained model is the exact score of the kept points:
    each subset's loss of each query is that model's denoising loss of the full-data
    sample at the fixed pairs, every training seed gives the same model (all of the
    variance is above the floor), and each LDS is the mean Spearman of the summed removed
    scores with the actual output."""
    out, summary = shared_run("counterfactual_closed_form")
    metrics = summary["metrics"]
    with np.load(out / "arrays.npz") as a:
        points, base, removed = (torch.from_numpy(a[k]) for k in ("train_points", "base", "datamodel/removed"))
        times, noises = output_pairs(10, 1, tuple(base.shape[1:]), 0, base.dtype, "cpu")
        for j in range(len(removed)):
            model = MixtureScore(GaussianMixture.empirical(points[~removed[j]]), VPLinear())
            np.testing.assert_allclose(a["datamodel/retrained_loss"][:, j],
                                       denoising_loss(model, base, times, noises).numpy(), rtol=1e-10)
        np.testing.assert_array_equal(a["floor_loss"], np.broadcast_to(a["base_loss"], a["floor_loss"].shape))
        for output in ("loss", "sample"):
            actual = a[f"lds/actual_{output}"]
            for name, value in metrics["lds"][output].items():
                predicted = a[f"lds/predicted_{name}"]
                if name != "ours_vector":
                    np.testing.assert_allclose(predicted, a[f"influence/{name}/scores"] @ a["datamodel/removed"].T)
                assert value["mean"] == pytest.approx(np.nanmean(spearman_rows(predicted, actual)))
                assert value["ci_low"] <= value["mean"] <= value["ci_high"]
    assert set(metrics["lds"]["loss"]) == {"ours_exact", "ours_clamped", "ours_set", "ours_loss", "l2"}
    # every pair of methods compared query by query: wins of the first's Spearman over the second's
    pairs = metrics["lds_pairwise"]["sample"]
    assert len(pairs) == 6 * 5 // 2
    for key, pair in pairs.items():
        a, b = (np.array(metrics["lds"]["sample"][name]["per_query"]) for name in key.split("_vs_"))
        assert (pair["wins"], pair["losses"]) == (int((a > b).sum()), int((a < b).sum()))
    assert metrics["noise_floor"]["loss"]["variance_above_floor"] == 1.0
    assert metrics["counterfactual"]["floor_seeds"] == 3


def test_removal_metrics_give_medians_with_intervals_and_a_sign_test_per_pair():
    """Ranking a moves 8 of 9 queries further than b: a win rate of 8/9 and the sign
    test's p = 2 (1 + 9) / 2^9; the medians are the per-query medians."""
    from diffsens_cli.pipelines.counterfactual import removal_metrics

    g = np.random.default_rng(0)
    b = g.uniform(0.1, 0.2, size=9)
    a = b + 0.05
    a[0] = b[0] - 0.01
    change = np.stack([a, b], axis=1)[:, :, None]  # [M, rankings, ks]
    loss = -change
    out = removal_metrics(change, loss, ["a", "b"], [7], seed=1)
    row = out["a"]["k7"]
    assert row["median_change"] == np.median(a) and row["ci_low"] <= row["median_change"] <= row["ci_high"]
    assert row["median_loss_change"] == np.median(-a)
    pair = out["pairwise"]["a_vs_b"]["k7"]
    assert pair["win_rate"] == 8 / 9 and pair["p_value"] == pytest.approx(20 / 512)
    assert "b_vs_a" not in out["pairwise"]


def test_the_noise_floor_is_per_query_the_mean_over_seeds_then_the_median_over_removal_queries():
    """``counterfactual.noise_floor`` and ``noise_floor_loss`` are summarised as each
    ranking's change is (per query a mean over seeds, the median over the removal
    queries), so the figure's line and the summary agree; the LDS-only query 2 is left out."""
    from diffsens_cli.pipelines.counterfactual import PREDICTIONS, Retrained, counterfactual_metrics

    base = np.ones((3, 4))  # 3 model samples; the first 2 are removal queries
    moves = np.array([[0.1, 0.2, 9.0], [0.3, 0.0, 9.0]])  # [seeds, samples]: |Delta x| / |x|
    floor = base[None] * (1 + moves[:, :, None])
    base_loss = np.array([2.0, 4.0, 1.0])
    floor_loss = base_loss * np.array([[1.1, 0.5, 5.0], [0.9, 1.0, 5.0]])
    after = np.ones((2, 1, 1, 4))
    out = Retrained(base, base_loss, floor, floor_loss, torch.zeros(2, 1, 1, 5, dtype=torch.bool), after,
                    np.ones((2, 1, 1)), np.ones((len(PREDICTIONS), 2, 1, 1, 4)), torch.zeros(1, 5, dtype=torch.bool),
                    np.ones((3, 1, 4)), np.ones((3, 1)), np.ones((len(PREDICTIONS), 3, 1, 4)))
    metrics, arrays = counterfactual_metrics(out, [("l2", 0)], ["l2"], [1])
    np.testing.assert_allclose(arrays["counterfactual/floor_change"], [0.2, 0.1])
    assert metrics["noise_floor"] == pytest.approx(0.15)  # median of the per-query means 0.2 and 0.1
    assert metrics["noise_floor_loss"] == pytest.approx(0.175)  # the median of mean(0.1, 0.1) and mean(0.5, 0)


def test_removals_for_the_first_queries_only_and_rankings_without_ours(tmp_path):
    """``counterfactual.queries=1``: removals for the first query alone (one random seed:
    one random column), while the LDS still scores both queries."""
    out, metrics = _run(tmp_path, "cf", "counterfactual.rankings=[l2,random]", "counterfactual.queries=1",
                        "counterfactual.random_seeds=1")
    cf = metrics["counterfactual"]
    assert set(cf) >= {"l2", "random"} and "ours" not in cf and cf["num_samples"] == 1
    assert all(v["queries"] == 2 for v in metrics["lds"]["loss"].values())
    with np.load(out / "arrays.npz") as a:
        assert a["counterfactual/removed"].shape == (1, 2, 2, 30) and a["lds/actual_loss"].shape == (2, 3)
    assert (out / "fig_counterfactual.png").stat().st_size > 0


def test_every_ranking_has_a_colour():
    from diffsens_cli.pipelines.shared.attribution import RANKINGS
    from diffsens_cli.plots.evaluation import RANKING_COLOURS

    assert set(RANKING_COLOURS) == set(RANKINGS) and len(set(RANKING_COLOURS.values())) == len(RANKINGS)


@pytest.mark.parametrize("args,expected", [
    (["counterfactual.remove=[30]"], "counterfactual.remove[0]: k = 30 must be below the number of training images "
                                     "N = 30"),
    (["counterfactual.remove=[1.5]"], "counterfactual.remove[0]: must be a whole number, got 1.5"),
    (["counterfactual.remove=[0]"], "counterfactual.remove[0]: must be a fraction in (0, 1) or a count >= 1, got 0"),
    (["datamodel.subsets=1"], "datamodel.subsets: must be >= 2"),
    (["counterfactual.floor_seeds=1"], "counterfactual.floor_seeds: must be >= 2 (the noise floor is a variance over "
                                                 "seeds), got 1"),
    (["counterfactual.rankings=[ours,nearest]"], "counterfactual.rankings[1]: 'nearest' is not one of ours_exact, "
                                                 "ours_clamped, ours_set, ours_loss, l2, feature, dtrak, ours, random, "
                                                 "least"),
    (["counterfactual.rankings=[ours,ours_set]", "influence.attributions=[ours_exact,l2]"],
     "counterfactual.rankings[1]: ranking 'ours_set' needs the score set 'ours_set': add it to influence.attributions"),
    (["counterfactual.rankings=[ours,least,feature]"],
     "counterfactual.rankings[2]: ranking 'feature' needs the score set 'feature'"),
    (["counterfactual.queries=3"], "counterfactual.queries: must be null or in 1 .. 2 (the number of "
                                   "influence.samples), got 3"),
    (["counterfactual.random_seeds=0"], "counterfactual.random_seeds: must be a whole number >= 1, got 0"),
    (["datamodel.keep=1.0"], "datamodel.keep: must be in (0, 1), got 1.0"),
    (["datamodel.keep=0.99"], "datamodel.keep: must keep some but not all of N = 30 images, got 0.99"),
    (["solver.method=sde"], "solver.method: counterfactual samples are compared along one deterministic path"),
])
def test_bad_counterfactual_input_is_one_clear_line(args, expected, cli_error):
    assert cli_error(["run", "experiment=counterfactual_closed_form", "size=tiny", *args]).startswith(expected)


def test_a_pretrained_model_is_refused_where_networks_are_retrained_from_scratch(cli_error):
    assert cli_error(["run", "experiment=digits_counterfactual", "size=tiny", "model=pretrained",
                      "model.path=/nowhere"]) == (
        "model.kind: counterfactual retraining trains a network from scratch on each subset of the data: give its "
        "architecture (model=unet or mlp), not model=pretrained")
