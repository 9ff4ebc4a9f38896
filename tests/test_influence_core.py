"""Per-training-sample influence (docs/design.md section 7): the per-point forcing against the
point-mass perturbations it replaces, the adjoint against forward tangents (exact
transposes of the discrete scheme), psi^n against a finite difference of the perturbed
flow, and the projections and randomised SVD against their exact counterparts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import influence_settings_with, solver_settings_with

from diffsens_cli.core import attribution
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.compare import spearman
from diffsens_cli.core.forcing import EmpiricalForcing, Perturbation
from diffsens_cli.core.influence import (
    influence,
    orthogonal_directions,
    project,
    randomized_svd,
    refine,
)
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPDiscrete, VPLinear
from diffsens_cli.core.steppers import STEP_RULES
from diffsens_cli.models.unet import build_network_model

pytestmark = pytest.mark.usefixtures("float64_default")
SCHED = VPLinear()
TINY_UNET = {"kind": "unet", "prediction": "epsilon", "layers_per_block": 1, "block_out_channels": [8, 16],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 4, "attention_head_dim": 4, "dropout": 0.0, "seed": 0}


def _empirical_problem(n_points: int = 12, d: int = 4, n_samples: int = 3, seed: int = 0):
    """The closed-form empirical model of ``n_points`` training points and model samples' z0."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n_points, d, generator=g)
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    z0 = model.sample_base(n_samples, (d,), torch.tensor(0.0), g)
    return points, model, z0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("clamp", [None, (0.1, 10.0)])
def test_one_tangent_per_point_equals_the_point_mass_perturbations(clamp):
    """``EmpiricalForcing`` without ``mix`` is the paper's method: tangent n equals the
    sensitivity to ``delta_{x_n}`` as an ordinary (one-point empirical) perturbation."""
    points, model, z0 = _empirical_problem()
    s = solver_settings_with(num_steps=30, density="ccov", weight_clamp=clamp, progress=False)
    ours = Integrator(model, s, EmpiricalForcing(points)).run(z0)
    ref = Integrator(model, s, Perturbation([GaussianMixture.empirical(x[None]) for x in points])).run(z0)
    torch.testing.assert_close(ours.psi, ref.psi, rtol=1e-10, atol=1e-12)
    total = sum(w.as_dict()["clamped_low"] for w in ref.weights)
    assert ours.weights[0].as_dict()["clamped_low"] == total and (clamp is None or total > 0)


def test_mixed_tangents_are_the_same_combinations_of_the_per_point_ones():
    """Forcing ``sum_n u[k, b, n] delta_{x_n}`` (weights clamped per point) gives
    ``sum_n u[k, b, n] psi^n_b``: the sensitivity is linear in the mixture weights."""
    points, model, z0 = _empirical_problem()
    s = solver_settings_with(num_steps=30, density="ccov", weight_clamp=(0.1, 10.0), progress=False, batch_size=2)
    per_point = Integrator(model, s, EmpiricalForcing(points)).run(z0).psi  # [N, B, d]
    u = torch.randn(5, len(z0), len(points), generator=torch.Generator().manual_seed(1))
    mixed = Integrator(model, s, EmpiricalForcing(points, mix=u)).run(z0).psi  # chunks of 2 samples
    torch.testing.assert_close(mixed, torch.einsum("kbn,nbd->kbd", u, per_point), rtol=1e-10, atol=1e-12)


def _forward_and_adjoint(model, points, z0, settings, clamps):
    """Exact psi^n [N, B, *event] per clamp, and the adjoint projections of random omegas."""
    forward = [Integrator(model, replace(settings, weight_clamp=c), EmpiricalForcing(points)).run(z0).psi
               for c in clamps]
    primal = Integrator(model, settings, tape=True).run(z0)
    # the same path as plain sampling (to round-off: here the score comes out of the probes' JVP)
    torch.testing.assert_close(primal.samples, Integrator(model, settings).run(z0).samples, rtol=1e-12, atol=1e-12)
    omega = torch.randn(4, *z0.shape, generator=torch.Generator().manual_seed(5))
    projected = project(model, primal.tape, EmpiricalForcing(points), omega, clamps, show_progress=False)
    return forward, omega, projected


@pytest.mark.parametrize("method,integrator", list(STEP_RULES))
def test_adjoint_projections_equal_forward_ones_closed_form(method, integrator):
    """One reverse pass gives ``omega^T psi^n`` for every n to round-off (float64), with
    and without the clamp, for every registered step rule (the SDE's path taken as recorded)."""
    points, model, z0 = _empirical_problem(n_points=15)
    density = "closed_form" if method == "sde" else "ccov"
    s = solver_settings_with(method=method, integrator=integrator, num_steps=40, density=density, progress=False,
                       batch_size=2)  # the tape is joined from chunks of 2 samples
    clamps = [None, (0.1, 10.0)]
    forward, omega, projected = _forward_and_adjoint(model, points, z0, s, clamps)
    for j in range(len(clamps)):
        expected = torch.einsum("mbd,nbd->mbn", omega, forward[j])
        assert _rel(projected[j], expected) < 1e-10, (integrator, clamps[j])
    assert _rel(forward[0], forward[1]) > 1e-3  # the clamp changed psi: both were exercised


@pytest.mark.parametrize("integrator", ["euler", "heun"])
def test_adjoint_projections_equal_forward_ones_unet(integrator):
    """The same through a (tiny, untrained) UNet: reverse-mode VJPs against forward-mode
    JVPs, CCoV density from a Hutchinson probe, clamped weights."""
    model = build_network_model(TINY_UNET, (1, 8, 8), VPDiscrete(), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    z0, points = torch.randn(2, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)
    s = solver_settings_with(integrator=integrator, num_steps=6, progress=False)
    forward, omega, projected = _forward_and_adjoint(model, points, z0, s, [(0.1, 10.0)])
    expected = torch.einsum("mbd,nbd->mbn", omega.flatten(2), forward[0].flatten(2))
    assert _rel(projected[0], expected) < 1e-8
    assert expected.abs().max() > 0


@pytest.mark.parametrize("method,integrator", list(STEP_RULES))
def test_psi_n_is_the_derivative_of_the_flow_when_x_n_is_upweighted(method, integrator):
    """Every registered step rule (a new sampler joins by its entry in ``STEP_RULES``), on
    the closed-form empirical model: psi^n by the forward tangent and by the rule's adjoint,
    against a second-order one-sided finite difference (a mixture weight cannot go below
    zero) of the flow of ``(1 - eta) rho + eta delta_{x_n}`` from the same z0 (exact
    densities, the same grid, for the SDE the same Wiener increments), for three points."""
    points, model, z0 = _empirical_problem(n_points=10, d=3, n_samples=4)
    s = solver_settings_with(method=method, integrator=integrator, num_steps=200, density="closed_form", progress=False)
    psi = Integrator(model, s, EmpiricalForcing(points)).run(z0).psi
    primal = Integrator(model, s, tape=True).run(z0)
    basis = torch.eye(3)[:, None].expand(3, *z0.shape)  # omega = each coordinate: the adjoint gives psi^n whole
    psi_adjoint = project(model, primal.tape, EmpiricalForcing(points), basis, [None], show_progress=False)[0]
    psi_adjoint = psi_adjoint.permute(2, 1, 0)  # [N, B, d]
    base = primal.samples
    eta = 1e-5
    for n in (0, 4, 9):
        ends = [Integrator(MixtureScore(model.measure.mix(GaussianMixture.empirical(points[n:n + 1]), e), SCHED),
                           s).run(z0).samples for e in (eta, 2 * eta)]
        fd = (4 * ends[0] - ends[1] - 3 * base) / (2 * eta)
        assert _rel(psi[n], fd) < 1e-5 and _rel(psi_adjoint[n], fd) < 1e-5, n


def test_orthogonal_projections_give_exact_norms_at_m_equal_d_and_unbiased_below():
    """``|Q psi|^2`` with ``m = d`` directions is ``|psi|^2``; with fewer, ``(d/m) |Q psi|^2 /
    |psi|^2`` is ``d/m`` times a Beta(m/2, (d-m)/2) variable: mean 1, variance
    ``2 (d - m) / (m (d + 2))``, below Johnson-Lindenstrauss's Gaussian ``2 / m``."""
    d = 30
    psi = torch.randn(d, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, d)
    q = orthogonal_directions(d, d, torch.Generator().manual_seed(1), torch.float64)
    torch.testing.assert_close((q @ psi).norm(), psi.norm(), rtol=1e-12, atol=0)
    m, draws = 8, 2000
    ratios = torch.stack([((orthogonal_directions(d, m, torch.Generator().manual_seed(s), torch.float64) @ psi) ** 2)
                          .sum() / (psi**2).sum() for s in range(draws)])
    var = 2 * (d - m) / (m * (d + 2))
    assert abs(ratios.mean() - 1) < 4 * (var / draws) ** 0.5
    assert abs(ratios.var() / var - 1) < 0.15


def test_randomized_svd_recovers_the_top_singular_triples():
    """HMT with oversampling and power iterations, through matrix-free callbacks, against
    ``torch.linalg.svd`` of explicit ``N x d`` matrices with a decaying spectrum."""
    g = torch.Generator().manual_seed(0)
    b, n, d, rank = 2, 200, 40, 5
    u = torch.linalg.qr(torch.randn(b, n, d, generator=g)).Q
    v = torch.linalg.qr(torch.randn(b, d, d, generator=g)).Q
    psi = u @ torch.diag_embed(0.7 ** torch.arange(d).expand(b, d)) @ v.transpose(1, 2)  # [B, N, d]

    def forward(mix):  # [l, B, N] -> [l, B, d]
        return torch.einsum("lbn,bnd->lbd", mix, psi)

    def adjoint(w):  # [l, B, d] -> [l, B, N]
        return torch.einsum("lbd,bnd->lbn", w, psi)

    omega = torch.randn(b, d, rank + 5, generator=g)
    sv, vh = randomized_svd(psi @ omega, forward, adjoint, rank, power_iterations=2)
    _, sv_ref, vh_ref = torch.linalg.svd(psi, full_matrices=False)
    torch.testing.assert_close(sv, sv_ref[:, :rank], rtol=1e-4, atol=0)
    alignment = (vh * vh_ref[:, :rank]).sum(-1).abs()
    assert alignment.min() > 0.999


def _refined_sketch(psi: torch.Tensor, m: int, width: int, rank: int, seed: int):
    """``refine`` on an explicit ``Psi`` [B, N, d] as ``influence`` calls it: projections on
    m Haar directions, a range finder on the first ``width`` (one power iteration), and
    ``V^T psi^n``; also the plain projection estimate of the scores."""
    d = psi.shape[-1]
    q = orthogonal_directions(d, m, torch.Generator().manual_seed(seed), torch.float64)
    proj = torch.einsum("md,bnd->mbn", q, psi)[None]  # [1, m, B, N]
    _, vh = randomized_svd(proj[0, :width].movedim(0, -1), lambda mix: torch.einsum("lbn,bnd->lbd", mix, psi),
                           lambda w: torch.einsum("lbd,bnd->lbn", w, psi), rank, power_iterations=1)
    psi_v = torch.einsum("brd,bnd->rbn", vh, psi)[None]
    scores, sv, vh = refine(proj, q, vh, psi_v, width)
    return scores[0], sv, vh, proj[0].pow(2).sum(0).sqrt()


def test_refined_scores_are_unbiased_exact_at_m_equal_d_and_far_less_noisy_when_psi_is_nearly_low_rank():
    """``refine`` against ``Psi`` known in full (rank 3 plus 5% noise, N = 60, d = 40):
    at m = d the scores and top singular values are exact; at m = 16 the squared scores
    average to the exact ones over 400 draws of the projections (unbiased) with a tenth
    of the variance of the plain projection estimate, and the top directions never
    explain more than all of ``|Psi|_F^2``."""
    g = torch.Generator().manual_seed(0)
    b, n, d = 1, 60, 40
    psi = torch.randn(b, n, 3, generator=g) @ torch.randn(b, 3, d, generator=g) + 0.05 * torch.randn(b, n, d,
                                                                                                     generator=g)
    exact = psi.norm(dim=-1)
    sv_ref = torch.linalg.svdvals(psi)
    scores, sv, _, _ = _refined_sketch(psi, d, 6, 3, seed=0)
    torch.testing.assert_close(scores, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(sv, sv_ref[:, :3], rtol=1e-10, atol=0)
    draws = [_refined_sketch(psi, 16, 6, 3, seed=s) for s in range(400)]
    refined = torch.stack([r[0] for r in draws]) ** 2  # [draws, B, N]
    plain = torch.stack([r[3] for r in draws]) ** 2
    stderr = refined.std(0) / len(draws) ** 0.5
    assert ((refined.mean(0) - exact**2).abs() < 4 * stderr + 1e-12).float().mean() > 0.97
    assert (refined.var(0) / plain.var(0)).median() < 0.1
    assert all((r[1] ** 2).sum() <= (r[0] ** 2).sum() + 1e-9 for r in draws)


def test_sketch_with_fewer_projections_than_dimensions_approaches_exact():
    """m < d: Johnson-Lindenstrauss scores and a randomised SVD (power iterations, the
    forward-mixture and adjoint callbacks) against the exact method on the closed-form
    empirical model: the leading singular values to a few percent and scores that rank
    the training points alike."""
    points, model, z0 = _empirical_problem(n_points=60, d=12, n_samples=2, seed=3)
    s = solver_settings_with(num_steps=40, density="closed_form", progress=False)
    exact = influence(model, s, points, z0, influence_settings_with(method="exact", rank=3), [None])
    sketch = influence(model, s, points, z0, influence_settings_with(projections=8, rank=3, oversample=5,
                                                               power_iterations=2), [None])
    assert exact.exact and not sketch.exact
    torch.testing.assert_close(sketch.singular_values[:, :2], exact.singular_values[:, :2], rtol=0.03, atol=0)
    alignment = (sketch.singular_vectors[:, 0] * exact.singular_vectors[:, 0]).sum(-1).abs()
    assert alignment.min() > 0.99
    for b in range(2):
        assert spearman(sketch.scores[0, b], exact.scores[0, b]) > 0.9


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_training_points_streamed_in_blocks_give_the_same_influence(method):
    """``block``: the points stay in host memory and go to the device a block at a time
    (here the same CPU, so the test sees the arithmetic only); the sums over points run
    block by block, and every result agrees with the resident run to round-off, also for
    a block that does not divide N and for ``ours_loss``'s derivative."""
    points, model, z0 = _empirical_problem(n_points=23, d=12, n_samples=2, seed=5)
    s = solver_settings_with(num_steps=20, density="closed_form", progress=False)
    settings = influence_settings_with(method=method, projections=8, rank=3, oversample=1, power_iterations=1)
    whole = influence(model, s, points, z0, settings, [None, (0.1, 10.0)])
    streamed = influence(model, s, points, z0, settings, [None, (0.1, 10.0)], block=5)
    for field in ("samples", "scores", "projections", "singular_values", "frobenius_sq"):
        torch.testing.assert_close(getattr(streamed, field), getattr(whole, field), rtol=1e-10, atol=1e-14,
                                   msg=field)
    assert [w.as_dict() for w in streamed.weights] == [w.as_dict() for w in whole.weights]
    times, noises = torch.tensor([0.2, 0.7], dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    resident = attribution.loss_sensitivity(model, points, z0, times, noises, (0.1, 10.0))
    torch.testing.assert_close(attribution.loss_sensitivity(model, points, z0, times, noises, (0.1, 10.0), block=5),
                               resident, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_a_batch_of_model_samples_gives_each_ones_influence(method):
    """Several model samples through one pass (paths, tapes and adjoint cotangents side by
    side, through a tiny UNet with a Gaussian probe and the randomised SVD): each one's
    scores, projections and singular triples equal its own run, its probes keyed by its
    row of the run (``sample_ids``), not by its place in the batch."""
    model = build_network_model(TINY_UNET, (1, 8, 8), VPDiscrete(), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    pool, points = torch.randn(6, 1, 8, 8, generator=g), torch.rand(9, 1, 8, 8, generator=g)
    s = solver_settings_with(integrator="heun", num_steps=5, probe="gaussian", progress=False)
    settings = influence_settings_with(method=method, projections=8, rank=2, oversample=1, power_iterations=1)
    rows = [4, 2, 5]
    together = influence(model, s, points, pool[rows], settings, [None, (0.1, 10.0)], sample_ids=torch.tensor(rows))
    for b, i in enumerate(rows):
        alone = influence(model, s, points, pool[i:i + 1], settings, [None, (0.1, 10.0)], first_index=i)
        torch.testing.assert_close(together.samples[b], alone.samples[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(together.scores[:, b], alone.scores[:, 0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(together.projections[:, :, b], alone.projections[:, :, 0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(together.singular_values[b], alone.singular_values[0], rtol=1e-8, atol=1e-12)
        assert _rel(together.singular_vectors[b].abs(), alone.singular_vectors[0].abs()) < 1e-7  # up to sign
        if method == "sketch":  # the adjoint's weight counts, per sample (the exact method's are per pass)
            assert [w.as_dict(b) for w in together.weights] == [w.as_dict() for w in alone.weights]
    # the CCoV log-densities the weights come from: each row's own probes, whatever its place
    density = Integrator(model, s, track_density=True)
    logp = density.run(pool[rows], sample_ids=torch.tensor(rows)).logp
    alone = torch.cat([density.run(pool[i:i + 1], first_index=i).logp for i in rows])
    torch.testing.assert_close(logp, alone, rtol=1e-10, atol=1e-10)
    assert (density.run(pool[rows], first_index=0).logp - logp).abs().min() > 1e-3  # rows 0-2's probes


def test_the_adjoint_tape_counts_in_the_chunk_estimate():
    """A taped run holds every evaluation's state per path until the adjoint: its chunk of
    paths is what the budget holds with the tape added to the per-path bytes."""
    from diffsens_cli.core.integrate import memory_budget, tape_bytes

    points, model, z0 = _empirical_problem(n_points=12, d=64, n_samples=512)
    model.cpu_chunk_bytes = 1 << 20
    s = solver_settings_with(num_steps=40, integrator="heun", density="closed_form", progress=False)
    budget = memory_budget(model, z0.device)
    per_path = model.memory_per_sample(64, 0, 8) + 8 * 64 * 6
    assert Integrator(model, s)._chunk_sizes(z0, 0, 1)[0] == int(budget // per_path)
    taped = Integrator(model, s, tape=True)._chunk_sizes(z0, 0, 1)[0]
    assert taped == int(budget // (per_path + tape_bytes(64, 8, 40 * 2))) < int(budget // per_path)
