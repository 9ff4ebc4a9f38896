"""The integrator's and the adjoint's bookkeeping against plain runs: recorded paths, the
tangents split by memory or halved on out-of-memory, the adjoint's cotangents in chunks
or halved, the sketch's rows for a second clamp, and its Frobenius norm below m = d."""

from __future__ import annotations

import pytest
import torch
from helpers import influence_settings_with, solver_settings_with, watch_chunks

from diffsens_cli.core import influence as influence_module
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.forcing import EmpiricalForcing, Perturbation
from diffsens_cli.core.influence import influence, orthogonal_directions, project
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.core.score_sensitivity import WeightStats

pytestmark = pytest.mark.usefixtures("float64_default")
SCHED = VPLinear()


def _problem(d: int = 5, n: int = 9):
    g = torch.Generator().manual_seed(0)
    rho = GaussianMixture(torch.stack([-torch.ones(d), torch.ones(d)]), torch.tensor([0.3, 0.3]), torch.ones(2))
    nus = [GaussianMixture(torch.randn(1, d, generator=g), torch.tensor([0.4]), torch.ones(1)) for _ in range(3)]
    model = MixtureScore(rho, SCHED)
    return model, Perturbation(nus), model.sample_base(n, (d,), torch.tensor(0.0), g)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_recorded_paths_end_at_the_samples_on_the_grids_times_whatever_the_chunks():
    """record_every=7 over 30 steps keeps grid points 0, 7, 14, 21, 28 and 30: at the grid's
    own times, the last one the samples and their psi, the same in chunks of 4 paths."""
    model, pert, z0 = _problem()
    s = solver_settings_with(num_steps=30, record_every=7, density="ccov", divergence="exact", progress=False)
    whole = Integrator(model, s, pert).run(z0)
    assert torch.equal(whole.path_times, whole.times[[0, 7, 14, 21, 28, 30]])
    assert whole.path.shape[:2] == (6, 9) and whole.psi_path.shape[:3] == (6, 3, 9)
    assert torch.equal(whole.path[0], z0) and torch.equal(whole.path[-1], whole.samples)
    assert torch.equal(whole.psi_path[-1], whole.psi) and not whole.psi_path[0].any()
    s.batch_size = 4
    chunked = Integrator(model, s, pert).run(z0)
    assert torch.equal(chunked.path_times, whole.path_times)
    _same(chunked.path, whole.path)
    _same(chunked.psi_path, whole.psi_path)


def test_tangents_split_by_the_memory_budget_give_the_unsplit_result(monkeypatch):
    """When one path's K = 3 tangents exceed the budget, the integrator splits the tangents
    (not the paths) and integrates each group along the same path: psi, samples and the
    weight counts equal one pass's."""
    model, pert, z0 = _problem()
    s = solver_settings_with(num_steps=20, density="ccov", divergence="exact", progress=False)
    whole = Integrator(model, s, pert).run(z0)
    integ = Integrator(model, s, pert)
    monkeypatch.setattr(model, "memory_per_sample", lambda numel, k, itemsize: 1000 * (k + 1))
    per_row = lambda k: 1000 * (k + 1) + 8 * 5 * (6 + 2 * k) + pert.memory_per_sample(8) + 8 * 5 * 2 * k
    monkeypatch.setattr(model, "cpu_chunk_bytes", per_row(2) - 1)  # two tangents do not fit, one does
    assert integ._chunk_sizes(z0, 3, 1) == (1, 1)
    groups = watch_chunks(monkeypatch, integ, lambda state: state.psi.shape[0])
    split = integ.run(z0)
    assert groups == [1, 1, 1] * 9
    _same(split.psi, whole.psi)
    _same(split.samples, whole.samples)
    assert [w.as_dict() for w in split.weights] == [w.as_dict() for w in whole.weights]


def test_out_of_memory_with_fixed_rows_halves_the_tangents(monkeypatch):
    """With solver.batch_size set, an out-of-memory error halves the tangents per pass
    instead (3 -> 1): the result is the one-pass result."""
    model, pert, z0 = _problem()
    s = solver_settings_with(num_steps=20, density="ccov", divergence="exact", progress=False, batch_size=9)
    whole = Integrator(model, s, pert).run(z0)
    integ = Integrator(model, s, pert)
    seen = watch_chunks(monkeypatch, integ, lambda state: state.psi.shape[0], fail_above=1)
    out = integ.run(z0)
    assert seen == [3, 1, 1, 1]
    _same(out.psi, whole.psi)
    s.tangent_batch_size = 3  # a size the user fixed is not changed: the error is theirs
    fixed = Integrator(model, s, pert)
    watch_chunks(monkeypatch, fixed, lambda state: state.psi.shape[0], fail_above=0)
    with pytest.raises(torch.OutOfMemoryError):
        fixed.run(z0)


def _adjoint_problem(d: int = 6, n_points: int = 10, n_samples: int = 2):
    g = torch.Generator().manual_seed(4)
    points = torch.randn(n_points, d, generator=g)
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    z0 = model.sample_base(n_samples, (d,), torch.tensor(0.0), g)
    s = solver_settings_with(num_steps=15, integrator="heun", density="closed_form", progress=False)
    tape = Integrator(model, s, tape=True).run(z0).tape
    q = orthogonal_directions(d, d, torch.Generator().manual_seed(0), z0.dtype)
    omega = q[:, None].expand(d, n_samples, d).clone()
    return model, tape, EmpiricalForcing(points), omega


def test_the_adjoints_cotangents_in_chunks_or_halved_on_out_of_memory_change_nothing(monkeypatch):
    """``project`` with its 6 cotangents in chunks of 4 (the last one short), and with an
    out-of-memory error above 2 cotangents (6 -> 3 -> 1), equals one pass, and counts
    each evaluation's weights once."""
    model, tape, forcing, omega = _adjoint_problem()
    clamps = [None, (0.1, 10.0)]
    stats = [WeightStats(), WeightStats()]
    whole = project(model, tape, forcing, omega, clamps, stats, show_progress=False)
    chunked_stats = [WeightStats(), WeightStats()]
    _same(project(model, tape, forcing, omega, clamps, chunked_stats, show_progress=False, chunk=4), whole)
    assert [w.as_dict() for w in chunked_stats] == [w.as_dict() for w in stats]
    real, seen = influence_module._reverse_pass, []

    def small_memory(model, tape, forcing, omega, *args):
        seen.append(len(omega))
        if len(omega) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(model, tape, forcing, omega, *args)

    monkeypatch.setattr(influence_module, "_reverse_pass", small_memory)
    halved_stats = [WeightStats(), WeightStats()]
    _same(project(model, tape, forcing, omega, clamps, halved_stats, show_progress=False), whole)
    assert seen == [6, 3, 1, 1, 1, 1, 1, 1]
    assert [w.as_dict() for w in halved_stats] == [w.as_dict() for w in stats]
    with pytest.raises(torch.OutOfMemoryError):  # a chunk the user fixed is not changed
        project(model, tape, forcing, omega, clamps, show_progress=False, chunk=3)


def test_the_sketchs_rows_for_each_clamp_and_its_frobenius_norm_match_the_exact_method():
    """Below m = d the sketch refines every clamp's scores from that clamp's own exact
    projections on the singular directions: each row is close to the exact method run with
    that clamp alone (and far from the other clamp's), and ``frobenius_sq`` (the first
    clamp's summed squared scores) is close to the exact ``|Psi|_F^2``; at m = d both are
    exact."""
    g = torch.Generator().manual_seed(3)
    points = torch.randn(60, 12, generator=g)
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    z0 = model.sample_base(2, (12,), torch.tensor(0.0), g)
    s = solver_settings_with(num_steps=40, density="closed_form", progress=False)
    clamps = [None, (0.9, 1.1)]
    exact = [influence(model, s, points, z0, influence_settings_with(method="exact", rank=12), [c]) for c in clamps]
    sketch = influence(model, s, points, z0, influence_settings_with(projections=8, rank=3, oversample=1,
                                                                     power_iterations=2), clamps)
    full = influence(model, s, points, z0, influence_settings_with(projections=12, rank=3), clamps)
    rel = lambda a, b: ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
    for c in range(2):
        torch.testing.assert_close(full.scores[c], exact[c].scores[0], rtol=1e-9, atol=1e-12)
        assert rel(sketch.scores[c], exact[c].scores[0]) < 0.1
        assert rel(sketch.scores[c], exact[1 - c].scores[0]) > 0.3
    torch.testing.assert_close(full.frobenius_sq, exact[0].frobenius_sq, rtol=1e-9, atol=0)
    # |Psi|_F^2 from the per-point norms equals the sum of all its squared singular values (d = 12 of them)
    torch.testing.assert_close(exact[0].frobenius_sq, exact[0].singular_values.pow(2).sum(-1), rtol=1e-10, atol=0)
    assert ((sketch.frobenius_sq / exact[0].frobenius_sq - 1).abs() < 0.05).all(), (sketch.frobenius_sq,
                                                                                 exact[0].frobenius_sq)
