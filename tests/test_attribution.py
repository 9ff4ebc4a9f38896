"""Attribution scores against exact answers: the loss output against a finite difference
of the closed-form loss, clamped sensitivities against a finite difference of the flow
with the clamped forcing, the greedy set order and the affine fit by hand, and the
influence run's score sets against the same finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import diffsens, solver_settings_with
from omegaconf import OmegaConf

from diffsens_cli.builders import solver_settings
from diffsens_cli.core import attribution
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.forcing import EmpiricalForcing
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.core.score_sensitivity import weight
from diffsens_cli.core.trak import output_pairs

SCHED = VPLinear()


def _upweighted(points: torch.Tensor, n: int, eta: float) -> MixtureScore:
    """The exact score of ``(1 - eta) rho + eta delta_{x_n}`` for the empirical rho of ``points``."""
    w = torch.full((len(points),), (1 - eta) / len(points), dtype=points.dtype)
    w[n] += eta
    return MixtureScore(GaussianMixture(points, torch.zeros(()), w), SCHED)


@pytest.mark.usefixtures("float64_default")
def test_loss_sensitivity_is_the_derivative_of_the_denoising_loss():
    """The closed-form empirical model: ``-dL/d eta_n`` against a central finite difference
    of the loss under ``(1 - eta) rho + eta delta_{x_n}``, for every n and two queries,
    at fixed (time, noise) pairs."""
    g = torch.Generator().manual_seed(0)
    points = torch.randn(6, 3, generator=g)
    queries = torch.randn(2, 3, generator=g)
    times, noises = output_pairs(4, 2, (3,), seed=1, dtype=torch.float64, device="cpu")
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    ours = attribution.loss_sensitivity(model, points, queries, times, noises, None)  # [B, N]
    eta = 1e-6
    for n in range(len(points)):
        up, down = (attribution.denoising_loss(_upweighted(points, n, e), queries, times, noises) for e in (eta, -eta))
        fd = (up - down) / (2 * eta)
        np.testing.assert_allclose(ours[:, n].numpy(), -fd.numpy(), rtol=1e-6, atol=1e-9)
    assert (ours > 0).any() and (ours < 0).any()  # proponents and opponents both occur
    # the sensitivities of all N images sum to zero for the exact score (the measure's mass is fixed)
    np.testing.assert_allclose(ours.sum(1).numpy(), 0, atol=1e-9)


class _ClampedShift(ScoreModel):
    """``s + eta g^n`` with Eq. 1's ``g^n`` under clamped weights (exact densities): the
    flow whose eta-derivative the clamped sensitivity psi^n is."""

    def __init__(self, model: MixtureScore, point: torch.Tensor, eta: float, clamp):
        self.model, self.point, self.eta, self.clamp = model, point, eta, clamp
        self.schedule = model.schedule

    def score(self, z, t):
        s = self.model.score(z, t)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        log_nu = -((z - alpha * self.point) ** 2).sum(-1) / (2 * sigma**2) - z.shape[1] / 2 * torch.log(
            2 * torch.pi * sigma**2)
        w = weight(log_nu, self.model.log_density(z, t), self.clamp)
        return s + self.eta * w[:, None] * ((alpha * self.point - z) / sigma**2 - s)

    @property
    def has_log_density(self) -> bool:
        return True

    def log_density(self, z, t):
        return self.model.log_density(z, t)


@pytest.mark.usefixtures("float64_default")
def test_clamped_sensitivities_are_the_derivative_of_the_flow_with_the_clamped_forcing():
    """psi^n with weights clamped to [0.1, 10] against a central finite difference of the
    flow whose score is shifted by eta times the clamped g^n; the clamp is active (some
    weights on the floor) and changes psi^n."""
    g = torch.Generator().manual_seed(2)
    points = torch.randn(8, 3, generator=g)
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    z0 = model.sample_base(3, (3,), torch.tensor(0.0), g)
    clamp = (0.1, 10.0)
    s = solver_settings_with(num_steps=100, density="closed_form", progress=False, weight_clamp=clamp)
    out = Integrator(model, s, EmpiricalForcing(points)).run(z0)
    exact = Integrator(model, solver_settings_with(num_steps=100, density="closed_form", progress=False),
                       EmpiricalForcing(points)).run(z0).psi
    assert out.weights[0].as_dict()["clamped_low"] > 0
    eta = 1e-6
    for n in (0, 5):
        up, down = (Integrator(_ClampedShift(model, points[n], e, clamp), s).run(z0).samples for e in (eta, -eta))
        fd = (up - down) / (2 * eta)
        assert float((out.psi[n] - fd).norm() / fd.norm()) < 1e-6, n
        assert float((exact[n] - fd).norm() / fd.norm()) > 1e-2, n  # the clamp mattered


def test_set_order_counts_cancellation():
    """Two large sensitivities that cancel: ranked one by one they come first, but removed
    together they move nothing; the greedy order takes the largest, then the one that adds
    to it most, and the opposite one last."""
    v = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    assert attribution.set_order(v).tolist() == [0, 2, 3, 1]
    assert attribution.rank_scores(torch.tensor([2, 0, 1])).tolist() == [2.0, 1.0, 3.0]


def test_affine_r2_by_construction():
    """Targets exactly affine in the images give R^2 = 1, also after a rotation of the
    targets (projections); targets independent of the images give about components / N."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(400, 6, generator=g)
    affine = images @ torch.randn(6, 5, generator=g) + torch.randn(5, generator=g)
    basis = attribution.principal_basis(images)
    assert attribution.affine_r2(affine, basis) == pytest.approx(1.0, abs=1e-12)
    blank = torch.cat([images, torch.zeros(400, 3)], 1)  # constant pixels, as the digits' borders
    assert attribution.affine_r2(affine, attribution.principal_basis(blank)) == pytest.approx(1.0, abs=1e-12)
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    noisy = affine.double() + torch.randn(400, 5, generator=g, dtype=torch.float64)
    assert attribution.affine_r2(noisy @ rotation, basis) == pytest.approx(attribution.affine_r2(noisy, basis))
    chance = attribution.affine_r2(torch.randn(400, 5, generator=g), basis)
    assert 0 < chance < 4 * 6 / 400
    assert attribution.top_k_overlap(torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor([1.0, 5, 4, 3, 2]), 2) == 0.5


def test_the_influence_run_scores_both_weights_against_finite_differences(shared_run):
    """experiment=influence_closed_form (tiny): ``influence/ours_exact/scores`` and
    ``ours_clamped/scores`` of sample 0 against |finite differences| of the flows from its
    z0 with the solver of the run's own config; ``ours`` is the exact one there, and the
    clamp diagnosis sees the clamp's floor only with the clamp."""
    out, summary = shared_run("influence_closed_form")
    summary = summary["metrics"]["influence"]
    s = solver_settings(OmegaConf.load(out / "config.yaml").solver)
    with np.load(out / "arrays.npz") as a:
        points, z0 = torch.from_numpy(a["train_points"]), torch.from_numpy(a["z0"][:1])
        exact, clamped = a["influence/ours_exact/scores"][0], a["influence/ours_clamped/scores"][0]
        np.testing.assert_array_equal(a["influence/scores"], a["influence/ours_exact/scores"])
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    base = Integrator(model, s).run(z0).samples
    eta = 1e-6
    for n in (0, 7, 20):
        fd_exact = (Integrator(_upweighted(points, n, eta), s).run(z0).samples - base) / eta
        up, down = (Integrator(_ClampedShift(model, points[n], e, (0.1, 10.0)), s).run(z0).samples
                    for e in (eta, -eta))
        assert exact[n] == pytest.approx(float(fd_exact.norm()), rel=1e-4), n
        assert clamped[n] == pytest.approx(float(((up - down) / (2 * eta)).norm()), rel=1e-6), n
    diagnosis = summary["clamp_diagnosis"]
    assert diagnosis["clamped"]["share_clamped_low"]["median"] > 0.1
    assert diagnosis["exact"]["share_clamped_low"]["median"] == 0
    assert summary["weights_used"] == "exact"


def test_ours_loss_takes_its_own_weights_whatever_ours_uses(tmp_path):
    """``influence.loss_weights`` sets ``ours_loss``' weights apart from ``influence.weights``
    (ours' ``exact`` here in both runs): its scores are the closed-form loss sensitivity of
    the run's sample 0 under the clamp, or without it, as asked."""
    def scores(loss_weights: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        out = tmp_path / loss_weights
        r = diffsens("run", "experiment=influence_closed_form", "size=tiny", f"hydra.run.dir={out}",
                     "solver.progress=false", "influence.attributions=[ours_exact,ours_loss]",
                     f"influence.loss_weights={loss_weights}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        with np.load(out / "arrays.npz") as a:
            return a["influence/ours_loss/scores"][0], torch.from_numpy(a["train_points"]), \
                torch.from_numpy(a["samples"][:1])

    clamped, points, x = scores("clamped")
    exact, _, _ = scores("exact")
    model = MixtureScore(GaussianMixture.empirical(points), SCHED)
    times, noises = output_pairs(10, 1, tuple(x.shape[1:]), seed=0, dtype=torch.float64, device="cpu")
    for got, clamp in ((clamped, (0.1, 10.0)), (exact, None)):
        want = attribution.loss_sensitivity(model, points, x, times, noises, clamp)[0]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-12)
    assert np.abs(clamped - exact).max() > 1e-3 * np.abs(exact).max()  # the two settings differ here
