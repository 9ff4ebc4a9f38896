"""The influence task (paper Sec. 4.4) end to end: both methods give the same scores and
singular values where the sketch is exact, the scores agree with the sensitivities the
figures show, the sketch's network cost does not grow with N, bad input fails in one
line, and a rerun reuses the finished model samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import influence_settings_with, run_tiny, solver_settings_with

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.compare import spearman
from diffsens_cli.core.forcing import EmpiricalForcing
from diffsens_cli.core.influence import influence
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.pipelines.influence import residuals


def _run(tmp_path, name: str, *overrides: str, experiment: str = "influence_closed_form"):
    out, metrics = run_tiny(tmp_path, name, experiment, *overrides)
    return out, metrics["influence"]


def test_sketch_and_exact_agree_and_match_the_shown_sensitivities(shared_run):
    """Closed-form model, m = d projections: the adjoint's scores and SVD equal the
    forward tangents' (float64), and the norms of the sensitivities computed for the
    figures (forward, one tangent per shown image) equal the scores at those images."""
    (sketch_dir, sketch), (exact_dir, exact) = (shared_run("influence_closed_form", *args) for args in
                                                ((), ("influence.method=exact",)))
    sketch, exact = sketch["metrics"]["influence"], exact["metrics"]["influence"]
    assert sketch["exact"] and exact["exact"] and sketch["method"] == "sketch"
    with np.load(sketch_dir / "arrays.npz") as s, np.load(exact_dir / "arrays.npz") as e:
        np.testing.assert_allclose(s["influence/scores"], e["influence/scores"], rtol=1e-9)
        np.testing.assert_allclose(s["influence/singular_values"], e["influence/singular_values"], rtol=1e-9)
        alignment = np.abs((s["influence/singular_vectors"] * e["influence/singular_vectors"]).sum(-1))
        np.testing.assert_allclose(alignment[:, :2], 1, atol=1e-6)  # the leading directions (distinct values)
        for m in range(len(s["samples"])):
            shown = np.linalg.norm(s["influence/shown_psi"][m], axis=-1)
            np.testing.assert_allclose(shown, s["influence/scores"][m][s["influence/shown_index"][m]], rtol=1e-9)
        assert s["train_points"].shape == (30, 10) and s["influence/scores"].shape == (2, 30)
    assert sketch["r2_l2"]["per_sample"] == pytest.approx(exact["r2_l2"]["per_sample"], rel=1e-9)
    # d = 10 = the rank kept: the top 10 directions hold all of |Psi|_F^2
    assert sketch["top10_variance"]["per_sample"] == pytest.approx([1.0, 1.0], rel=1e-12)


def test_the_top_10_share_of_psi_equals_a_direct_svds_where_psi_has_more_directions(tmp_path):
    """d = 32 (m = d: exact): the summary's share of |Psi_b|_F^2 in the top 10 singular
    directions against the SVD of Psi_b computed here, one forward tangent per training
    point along the same path."""
    out, metrics = _run(tmp_path, "wide", "dataset.dim=32", "influence.projections=32",
                        "influence.num_train=200")
    with np.load(out / "arrays.npz") as arrays:
        points, z0 = torch.from_numpy(arrays["train_points"]), torch.from_numpy(arrays["z0"])
    model = MixtureScore(GaussianMixture.empirical(points), VPLinear())
    s = solver_settings_with(step_size=0.02, density="closed_form", progress=False)
    psi = Integrator(model, s, EmpiricalForcing(points)).run(z0).psi  # [N, B, d]
    sv = torch.linalg.svdvals(psi.movedim(1, 0))
    expected = (sv[:, :10] ** 2).sum(1) / (sv**2).sum(1)
    assert expected.max() < 0.999, expected  # not 1 by construction
    np.testing.assert_allclose(metrics["top10_variance"]["per_sample"], expected.numpy(), rtol=1e-9)


def test_the_sketch_costs_the_same_network_passes_for_any_number_of_training_points():
    """Counted network calls and the vectors they carry: the sketch's (2 projections of
    d = 3, a randomised SVD with a power iteration) do not depend on N, the exact
    method's vectors grow with N."""
    g = torch.Generator().manual_seed(0)
    s = solver_settings_with(num_steps=20, density="closed_form", progress=False)
    costs = {}
    for n in (10, 40):
        points = torch.randn(n, 3, generator=g, dtype=torch.float64)
        model = MixtureScore(GaussianMixture.empirical(points), VPLinear())
        z0 = model.sample_base(2, (3,), torch.tensor(0.0, dtype=torch.float64), g)
        for method in ("exact", "sketch"):
            res = influence(model, s, points, z0, influence_settings_with(method=method, projections=2, rank=1,
                                                                    oversample=1, power_iterations=1), [None])
            costs[method, n] = (res.network_calls, res.network_vectors)
    assert costs["sketch", 10] == costs["sketch", 40]
    assert costs["exact", 40][1] == 4 * costs["exact", 10][1]  # one tangent per point per evaluation


@pytest.mark.parametrize("args,expected", [
    (["influence.samples=[0,5]"], "influence.samples: index 5 is out of range: the pool has 2 samples"),
    (["influence.projections=0"], "influence.projections: must be a whole number >= 1, got 0"),
    (["influence.rank=31"], "influence.rank: must not exceed the number of training images N = 30, got 31"),
    (["influence.num_train=0"], "influence.num_train: must be null or a whole number >= 1, got 0"),
    (["influence.method=adjoint"], "influence.method: 'adjoint' is not one of exact, sketch"),
    (["influence.weights=soft"], "influence.weights: 'soft' is not one of clamped, exact"),
    (["influence.loss_weights=hard"], "influence.loss_weights: 'hard' is not one of clamped, exact"),
    (["influence.attributions=[ours_exact,trak]"], "influence.attributions[1]: 'trak' is not one of ours_exact, "
                                                   "ours_clamped, ours_set, ours_loss, l2, feature, dtrak"),
    (["influence.attributions=[ours_exact,dtrak]"], "influence.attributions: dtrak needs a network's parameters"),
    (["influence.clamp=[10,0.1]"], "influence.clamp: must be [low, high] with 0 < low < high, got [10.0, 0.1]"),
    (["influence.loss_pairs.timesteps=0"], "influence.loss_pairs.timesteps: must be a whole number >= 1, got 0"),
    (["influence.projections=8"], "influence.rank: rank + oversample (20) must not exceed half of "
                                  "influence.projections (8 // 2)"),
])
def test_bad_influence_input_is_one_clear_line(args, expected, cli_error):
    assert cli_error(["run", "experiment=influence_closed_form", "size=tiny", *args]).startswith(expected)


def test_a_projection_dimension_below_one_is_one_clear_line(cli_error):
    assert cli_error(["run", "experiment=digits_influence", "size=tiny", "influence.dtrak.projection_dim=0"]
                     ).startswith("influence.dtrak.projection_dim: must be a whole number >= 1, got 0")


def test_a_rerun_reuses_the_finished_model_samples(tmp_path):
    """Each model sample is its own stage: a run asking for one more sample computes only
    that one (what an interrupted run resumes from)."""
    _run(tmp_path, "first", "influence.samples=[0]")
    stages = sorted(tmp_path.glob("outputs/stages/influence/*/arrays.npz"))
    assert len(stages) == 1
    mtime = stages[0].stat().st_mtime_ns
    _run(tmp_path, "second", "influence.samples=[0,1]")
    after = sorted(tmp_path.glob("outputs/stages/influence/*/arrays.npz"))
    assert len(after) == 2 and stages[0] in after and stages[0].stat().st_mtime_ns == mtime


def test_residuals_are_what_the_line_on_distance_leaves():
    """A score exactly linear in distance but for one image raised by 3: the line absorbs
    the linear part, so the residuals are 3 (I - H) e_7 with H the hat matrix of the fit
    on [1, x]: r_i = 3 (delta_i7 - 1/n - (x_i - mean x)(x_7 - mean x) / S_xx)."""
    l2 = torch.linspace(1, 5, 20, dtype=torch.float64)[None]
    scores = 2 * l2 + 1
    scores[0, 7] += 3.0
    r = residuals(l2, scores)[0]
    x = l2[0] - l2[0].mean()
    expected = 3 * (torch.eye(20, dtype=torch.float64)[7] - 1 / 20 - x * x[7] / (x * x).sum())
    torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)


def test_spearman_is_the_rank_correlation():
    x = torch.tensor([0.1, 5.0, 2.0, 3.0, -1.0], dtype=torch.float64)
    assert float(spearman(x, x.exp())) == pytest.approx(1.0)
    assert float(spearman(x, -x**3)) == pytest.approx(-1.0)
    # ranks [1,4,2,3,0] against [0,1,2,3,4]: d^2 = 1+9+0+0+16, 1 - 6 sum d^2 / (n (n^2 - 1)) = -0.3
    assert float(spearman(x, torch.arange(5.0))) == pytest.approx(1 - 6 * 26 / 120)


def test_the_cnn_classifier_of_the_crossclass_experiments_learns_the_digits():
    """``crossclass.classifier=cnn`` (cifar10_crossclass's): fitted on 80% of the embedded
    digits for 5 epochs, it labels the held-out 20% and the images it is asked about; its
    seeded initial weights leave the caller's global torch RNG as it was."""
    from sklearn.datasets import load_digits

    from diffsens_cli.pipelines.shared import crossclass

    digits = load_digits()
    images = (digits.images[:, None] / 8 - 1).astype(np.float32)  # [N, 1, 8, 8] in [-1, 1]
    rng_state = torch.random.get_rng_state()
    classes, accuracy = crossclass.classify(images, digits.target, images[:100], 0.2, seed=0, classifier="cnn",
                                            epochs=5)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert accuracy > 0.95
    assert (classes == digits.target[:100]).mean() > 0.95


def test_crossclass_matrix_and_diagonal_dominance_by_hand():
    """Entry (i, j): the mean over class-i samples of the mean score of class-j training
    images; NaN for a class no sample has. Dominance: mean diagonal / mean off-diagonal."""
    from diffsens_cli.pipelines.shared import crossclass

    scores = np.array([[4.0, 2.0, 1.0, 3.0],   # sample of class 0
                       [2.0, 0.0, 5.0, 1.0],   # sample of class 1
                       [6.0, 4.0, 3.0, 1.0]])  # sample of class 0
    matrix = crossclass.crossclass_matrix(scores, np.array([0, 1, 0]), np.array([0, 0, 1, 1]), np.array([0, 1, 2]))
    expected = np.array([[(3 + 5) / 2, (2 + 2) / 2, np.nan], [1, 3, np.nan], [np.nan, np.nan, np.nan]])
    np.testing.assert_allclose(matrix, expected)
    assert crossclass.diagonal_dominance(matrix) == pytest.approx(((4 + 3) / 2) / ((2 + 1) / 2))


def test_model_samples_computed_together_are_stored_as_each_ones_stage(tmp_path):
    """influence.query_batch: three samples in one pass leave three stages holding what
    one at a time holds (to round-off), and a later run of one of them alone reuses its
    stage."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rows = ("influence.samples=[0,2,3]", "influence.pool=4")
    together, _ = _run(tmp_path / "a", "run", *rows, "influence.query_batch=3")
    alone, _ = _run(tmp_path / "b", "run", *rows, "influence.query_batch=1")
    assert len(list((tmp_path / "a").glob("outputs/stages/influence/*/arrays.npz"))) == 3
    with np.load(together / "arrays.npz") as t, np.load(alone / "arrays.npz") as a:
        for key in ("samples", "influence/scores", "influence/ours_clamped/scores", "influence/singular_values"):
            np.testing.assert_allclose(t[key], a[key], rtol=1e-9, atol=1e-12, err_msg=key)
    stages = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("outputs/stages/influence/*/arrays.npz")}
    _run(tmp_path / "a", "again", "influence.samples=[2]", "influence.pool=4")
    assert {p: p.stat().st_mtime_ns for p in stages} == stages
