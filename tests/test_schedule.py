"""Schedules: closed forms of a_t, c_t and the discrete/continuous VP agreement."""

import pytest
import torch

from diffsens_cli.core.schedule import EDM, VE, SubVP, VPDiscrete, VPLinear, time_grid

T = torch.linspace(0.0, 1 - 1e-3, 999, dtype=torch.float64)


def test_vp_coefficients_are_half_beta():
    """For VP in paper time, a_t = c_t = beta(tau)/2 (docs/design.md section 2)."""
    s = VPLinear()
    co = s.coefficients(T)
    beta = 1000 * (1e-4 + (1 - T) * (0.02 - 1e-4))
    torch.testing.assert_close(co.a, beta / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(co.c, beta / 2, rtol=1e-9, atol=0)
    torch.testing.assert_close(co.alpha**2 + co.sigma**2, torch.ones_like(T), rtol=1e-12, atol=0)


def test_discrete_matches_ddpm_alphas_cumprod_at_grid_points():
    """At tau = (n+1)/N the discrete schedule is exactly diffusers' alphas_cumprod."""
    s = VPDiscrete()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    n = torch.arange(1000, dtype=torch.float64)
    t = 1 - (n + 1) / 1000
    torch.testing.assert_close(s.alpha(t) ** 2, alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.model_time(t), n, rtol=0, atol=1e-9)


def test_discrete_and_continuous_vp_agree():
    """Stated tolerance: |alpha_c - alpha_d| and |sigma_c - sigma_d| below 2e-3 on the grid.
    (The gap is the sum of beta_n^2/2 that log(1 - beta) adds to -beta, about 0.067 in
    log alphabar at tau = 1, where alpha itself is only 0.0066.)"""
    c, d = VPLinear(), VPDiscrete()
    assert (c.alpha(T) - d.alpha(T)).abs().max() < 2e-3
    assert (c.sigma(T) - d.sigma(T)).abs().max() < 2e-3
    # and the discrete drift coefficients are consistent with its own alpha, sigma:
    co = d.coefficients(T)
    torch.testing.assert_close(co.c, co.a, rtol=1e-9, atol=1e-12)  # VP: c = a = beta/2


@pytest.mark.parametrize("sched", [VPLinear(), VPDiscrete(), SubVP(), VE(), EDM()])
def test_coefficients_against_finite_differences(sched):
    t = torch.linspace(0.05, 0.95, 37, dtype=torch.float64) + 1e-4  # off the discrete knots
    co = sched.coefficients(t)
    h = 1e-7
    dlog_alpha = (sched.alpha(t + h).log() - sched.alpha(t - h).log()) / (2 * h)
    dsigma = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(co.a, dlog_alpha, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(co.c, co.a * co.sigma**2 - co.sigma * dsigma, rtol=1e-5, atol=1e-6)


def test_time_grid_rounds_step_size():
    assert time_grid(1e-3, None, 5e-3) == (0.0, 0.999, 200)
    assert time_grid(1e-3, 17, None) == (0.0, 0.999, 17)


@pytest.mark.parametrize("name", ["vp_linear", "subvp", "ve", "edm"])
def test_alpha_and_sigma_are_the_published_formulas(name):
    """In diffusion time tau = 1 - t: VP (Song et al. 2021) alpha = exp(-(b0 tau + (b1 - b0)
    tau^2 / 2) N / 2), sigma^2 = 1 - alpha^2; sub-VP the same alpha, sigma = 1 - alpha^2; VE
    alpha = 1, sigma = s_min (s_max / s_min)^tau; EDM alpha = 1, sigma = s_max tau."""
    tau = 1 - T
    vp_alpha = torch.exp(-0.5 * 1000 * (1e-4 * tau + 0.5 * (0.02 - 1e-4) * tau**2))
    expected = {"vp_linear": (VPLinear(), vp_alpha, (1 - vp_alpha**2).sqrt()),
                "subvp": (SubVP(), vp_alpha, 1 - vp_alpha**2),
                "ve": (VE(sigma_min=0.02, sigma_max=30.0), torch.ones_like(tau), 0.02 * (30.0 / 0.02) ** tau),
                "edm": (EDM(sigma_max=60.0), torch.ones_like(tau), 60.0 * tau)}
    sched, alpha, sigma = expected[name]
    torch.testing.assert_close(sched.alpha(T), alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigma(T), sigma, rtol=1e-10, atol=1e-15)

