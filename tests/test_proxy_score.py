"""The proxy score's covariance and the naive sampler (core.proxy_score) against closed forms:
GtV Eq. 5's identity C = I/sigma^2 + J s, exact posteriors, and the naive sampler's variance on a
Gaussian target, where its Euler recursion is linear and its variance known step by step."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import solver_settings_with

from diffsens_cli.core import keyed_random
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.proxy_score import (
    naive_sample,
    naive_score,
    predicted_covariance,
    proxy_covariance,
    proxy_score,
    variance_share,
)
from diffsens_cli.core.schedule import EDM, KARRAS_RHO, VPLinear, grid_times

F64 = torch.float64


def _mixtures() -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(3)
    means = torch.randn(5, 3, generator=g, dtype=F64)
    return {"points": GaussianMixture.empirical(means),
            "gaussians": GaussianMixture(means, torch.tensor([0.3, 0.1, 0.5, 0.2, 0.4], dtype=F64),
                                         torch.tensor([1.0, 2.0, 1.0, 0.5, 1.5], dtype=F64))}


@pytest.mark.parametrize("kind", ["points", "gaussians"])
@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.4), (0.8, 0.9), (0.99, 0.15)])
def test_proxy_covariance_is_inverse_noise_variance_plus_score_jacobian(kind, alpha, sigma):
    """GtV Eq. 5: Cov[s~ | z] = S^-1 + Hessian of log p = I / sigma^2 + J_z s, with J_z s from
    the measure's own closed-form JVPs (the centred form of docs/design.md section 4)."""
    measure = _mixtures()[kind]
    a, s = torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64)
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    cov, score = proxy_covariance(measure, z, a, s)
    eye = torch.eye(3, dtype=F64)
    stats = measure.diffused(z, a, s, tangents=eye[:, None, :].expand(3, 7, 3).contiguous())
    jac = stats.jvp.permute(1, 2, 0)  # [B, i, j] = (J s e_j)_i
    torch.testing.assert_close(cov, eye / sigma**2 + jac, rtol=1e-9, atol=1e-9 / sigma**2)
    torch.testing.assert_close(score, stats.score, rtol=1e-12, atol=1e-12)


def test_variance_share_of_two_points_in_closed_form():
    """Points 0 and e1: the posterior weight of e1 is w = sigmoid((2 x_1 - 1) / (2 sigma^2)), tr C
    is w (1 - w) / sigma^4 and |s|^2 = |w e1 - x|^2 / sigma^4.  So the share is 1 at the
    midpoint at every sigma, (1/4) / (1/4 + y^2) on the bisector, and, at a point itself,
    the point's own weight (noise and signal both vanish there), near 0 beside it."""
    measure = GaussianMixture.empirical(torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64))
    one = torch.tensor(1.0, dtype=F64)
    z = torch.cat([torch.tensor([[0.5, 0.0], [0.5, 0.7], [0.0, 0.0], [0.0, 0.2]], dtype=F64),
                   torch.randn(20, 2, generator=torch.Generator().manual_seed(2), dtype=F64)])
    for sigma in (0.1, 0.3, 2.0):
        share = variance_share(measure, z, one, torch.tensor(sigma, dtype=F64))
        u = (2 * z[:, 0] - 1) / (2 * sigma**2)
        w, noise = torch.sigmoid(u), torch.sigmoid(u) * torch.sigmoid(-u)
        signal = (w - z[:, 0]) ** 2 + z[:, 1] ** 2
        torch.testing.assert_close(share, noise / (noise + signal), rtol=1e-10, atol=1e-300)
        assert share[0] == 1 and abs(share[1] - 0.25 / (0.25 + 0.49)) < 1e-12
    share = variance_share(measure, z[2:4], one, torch.tensor(0.1, dtype=F64))
    assert abs(share[0] - (1 - 1 / (1 + math.exp(50)))) < 1e-12 and share[1] < 1e-20


@pytest.mark.parametrize("kind", ["points", "gaussians"])
def test_posterior_draws_have_the_closed_form_proxy_covariance(kind):
    """Monte Carlo: the proxy scores of 200k posterior draws at a point have the mean s and the
    covariance C of the closed forms, to a few standard errors (about 0.3% here)."""
    measure = _mixtures()[kind]
    a, s = torch.tensor(0.9, dtype=F64), torch.tensor(0.6, dtype=F64)
    z = measure.means[:2].mean(0, keepdim=True) * 0.9  # between two of the points: a mixed posterior
    n = 200_000
    ids = torch.zeros(1, dtype=torch.int64)
    u = keyed_random.uniform((n,), ids, seed=1, stream=keyed_random.POSTERIOR, step=0)
    normals = keyed_random.normal((n, 3), ids, seed=1, stream=keyed_random.POSTERIOR_NOISE, step=0, dtype=F64)
    draws = proxy_score(measure.sample_posterior(z, a, s, u, normals), z[:, None, :], a, s)[0]  # [n, d]
    cov, score = proxy_covariance(measure, z, a, s)
    dev = draws - draws.mean(0)
    sample_cov = dev.T @ dev / (n - 1)
    tr = cov[0].trace()
    assert (sample_cov.trace() - tr).abs() / tr < 0.01
    assert (sample_cov - cov[0]).abs().max() / tr < 0.01
    assert (draws.mean(0) - score[0]).norm() < 4 * (tr / n).sqrt()


def _gaussian_recursion(schedule, times, mean0, var0, mu, std, draws):
    """Mean and per-coordinate variance of the naive sampler's Euler recursion on the single
    Gaussian N(mu, std^2 I): the exact score is linear, s = -(z - alpha mu) / C, and a posterior
    draw has variance v = std^2 sigma^2 / C, so ``z' = z + h(a z + c s^)`` moves both exactly."""
    co = schedule.coefficients(times)
    m, var = mean0, var0
    for k in range(len(times) - 1):
        h = times[k + 1] - times[k]
        a, c, al, sg = co.a[k], co.c[k], co.alpha[k], co.sigma[k]
        big_c = al**2 * std**2 + sg**2
        gain = 1 + h * (a - c / big_c)
        m = gain * m + h * c * al * mu / big_c
        var = gain**2 * var + (h * c * al / sg**2) ** 2 * (std**2 * sg**2 / big_c) / draws
    return m, var


@pytest.mark.parametrize("noise", ["posterior", "gaussian"])
@pytest.mark.parametrize("draws", [1, 4])
def test_naive_sampler_variance_on_a_gaussian_is_the_linear_recursion(noise, draws):
    """From one fixed start, 20k naive paths on N(mu, 0.5^2 I) end with the mean and the
    variance of the exact Euler recursion (their noise enters as h c C/R h c per step: the
    1/R and the step size both matter), to 3 standard errors of a sample variance."""
    schedule = VPLinear()
    times = grid_times(schedule, 0.0, 1 - 1e-3, 40, "log_snr")
    mu, std = torch.tensor([0.7, -0.3], dtype=F64), 0.5
    measure = GaussianMixture(mu[None], torch.tensor([std], dtype=F64), torch.ones(1, dtype=F64))
    n = 20_000
    z0 = torch.tensor([[0.4, 1.1]], dtype=F64).expand(n, 2)
    end = naive_sample(measure, schedule, times, z0, draws, seed=5, noise=noise)
    m, var = _gaussian_recursion(schedule, times, z0[0], torch.zeros((), dtype=F64), mu, std, draws)
    sample_var = end.var(0)
    assert ((sample_var - var).abs() / var < 3 * math.sqrt(2 / n)).all(), (sample_var, var)
    assert ((end.mean(0) - m).abs() < 4 * (var / n).sqrt()).all()


def test_naive_sampler_on_one_point_is_the_euler_pf_ode():
    """One point mass: every posterior draw is the point, the naive score is the score, and the
    naive sampler is the integrator's forward Euler exactly."""
    schedule = EDM()
    measure = GaussianMixture.empirical(torch.tensor([[0.3, -0.8]], dtype=F64))
    settings = solver_settings_with(num_steps=30, spacing="karras", t_min=2.5e-5, step_size=None)
    z0 = torch.randn(9, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 80
    naive = naive_sample(measure, schedule, settings.times(schedule), z0, 3, seed=0)
    exact = Integrator(MixtureScore(measure, schedule), settings).run(z0).samples
    torch.testing.assert_close(naive, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("noise", ["posterior", "gaussian"])
def test_naive_draws_belong_to_their_path_not_their_batch(noise):
    """Paths 3..6 alone end where they end among all 8 (keyed random numbers)."""
    schedule = EDM()
    measure = GaussianMixture.empirical(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64))
    times = grid_times(schedule, 0.0, 1 - 2.5e-5, 18, "karras")
    z0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 80
    every = naive_sample(measure, schedule, times, z0, 2, seed=7, noise=noise)
    some = naive_sample(measure, schedule, times, z0[3:7], 2, seed=7, noise=noise, ids=torch.arange(3, 7))
    torch.testing.assert_close(some, every[3:7], rtol=0, atol=0)
    other = naive_sample(measure, schedule, times, z0, 2, seed=8, noise=noise)
    assert (other - every).abs().max() > 1e-3


def test_naive_score_is_unbiased_with_covariance_c_over_r():
    """At one point, many independent naive estimates (R = 3) average to s with covariance C / 3."""
    measure = _mixtures()["points"]
    a, s = torch.tensor(1.0, dtype=F64), torch.tensor(0.8, dtype=F64)
    n = 100_000
    z = measure.means[:2].mean(0, keepdim=True).expand(n, 3).contiguous()
    est = naive_score(measure, z, a, s, 3, seed=2, step=0, ids=torch.arange(n))
    cov, score = proxy_covariance(measure, z[:1], a, s)
    dev = est - est.mean(0)
    tr = cov[0].trace() / 3
    assert ((dev.T @ dev / (n - 1)).trace() - tr).abs() / tr < 0.02
    assert (est.mean(0) - score[0]).norm() < 4 * (tr / n).sqrt()


def test_karras_grid_is_uniform_in_sigma_to_the_one_seventh():
    """EDM's sampler grid (Karras et al. 2022, Eq. 5) from sigma_max = 80 to 0.002."""
    schedule = EDM()
    times = grid_times(schedule, 0.0, 1 - 0.002 / 80, 18, "karras")
    sigma = schedule.sigma(times)
    i = torch.arange(19, dtype=F64) / 18
    rho = KARRAS_RHO
    expected = (80 ** (1 / rho) + i * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    torch.testing.assert_close(sigma, expected, rtol=1e-6, atol=0)


def test_predicted_covariance_is_exact_where_the_sampler_is_linear():
    """On one Gaussian the naive sampler's Euler recursion is linear, so the adjoint's first-order
    covariance (one reverse pass, C in place of the forcing) is its exact variance, per
    coordinate, with no cross terms, for every start."""
    schedule = VPLinear()
    settings = solver_settings_with(num_steps=40, step_size=None, spacing="log_snr", density="closed_form",
                                    dtype="float64", progress=False)
    mu, std = torch.tensor([0.7, -0.3], dtype=F64), 0.5
    measure = GaussianMixture(mu[None], torch.tensor([std], dtype=F64), torch.ones(1, dtype=F64))
    model = MixtureScore(measure, schedule)
    z0 = torch.tensor([[0.4, 1.1], [-2.0, 0.3], [0.0, 0.0]], dtype=F64)
    tape = Integrator(model, settings, tape=True).run(z0).tape
    for draws in (1, 4):
        cov = predicted_covariance(measure, model, tape, draws)
        _, var = _gaussian_recursion(schedule, settings.times(schedule), z0[0], torch.zeros((), dtype=F64), mu, std,
                                     draws)
        torch.testing.assert_close(cov, var * torch.eye(2, dtype=F64).expand(3, 2, 2), rtol=1e-10, atol=1e-20)


def test_predicted_covariance_matches_many_naive_paths_from_one_start():
    """Three points, 18 EDM steps, starts whose paths stay in one basin: at R = 1024 (small noise,
    where first order holds) every one of 4000 naive repeats from each start ends at the PF-ODE's
    point, and their covariance is the predicted one to about 3 standard errors of a sample
    variance (2.2% each), off-diagonal included."""
    schedule = EDM()
    settings = solver_settings_with(num_steps=18, step_size=None, spacing="karras", t_min=6.25e-4,
                                    density="closed_form", dtype="float64", progress=False)
    measure = GaussianMixture.empirical(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64))
    model = MixtureScore(measure, schedule)
    z0 = torch.tensor([[-40.0, -40.0], [50.0, 10.0]], dtype=F64)
    res = Integrator(model, settings, tape=True).run(z0)
    predicted = predicted_covariance(measure, model, res.tape, 1024)
    n = 4000
    for i in range(len(z0)):
        ends = naive_sample(measure, schedule, settings.times(schedule), z0[i:i + 1].expand(n, 2), 1024, seed=3)
        nearest = torch.cdist(ends, measure.means).argmin(1)
        assert (nearest == torch.cdist(res.samples[i:i + 1], measure.means).argmin()).all()
        dev = ends - ends.mean(0)
        empirical = dev.T @ dev / (n - 1)
        tr = predicted[i].trace()
        assert tr > 1e-7 and torch.linalg.matrix_norm(empirical - predicted[i]) / tr < 0.07, (i, empirical,
                                                                                              predicted[i])
