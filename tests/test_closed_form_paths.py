"""The sampler's paths against independent closed forms, for a Gaussian target
rho = N(mu, s^2 I), whose diffused law is N(alpha_t mu, V_t I), V_t = alpha_t^2 s^2 + sigma_t^2:

- the reverse SDE's samples: Euler-Maruyama on this linear SDE keeps Gaussian laws whose
  mean and variance follow an exact scalar recursion, so the end samples' moments are
  checked against it to within the sampling error alone, and the recursion against the
  continuous law to within the step's bias;
- the PF-ODE flow map: ``z_t - alpha_t mu = sqrt(V_t / V_0) (z_0 - alpha_0 mu)``, with
  Jacobian ``sqrt(V_t / V_0) I``, and psi toward nu = N(mu', s^2 I) as a scalar integral
  along that path (a fine quadrature);
- Hutchinson inside the integrator: the CCoV log-density's probe error has mean zero and
  the variance the probes' own variance predicts, step by step.
"""

import math

import pytest
import torch
from helpers import solver_settings_with

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import EDM, VE, SubVP, VPDiscrete, VPLinear

pytestmark = pytest.mark.usefixtures("float64_default")

SCHEDULES = {"vp_linear": VPLinear(), "vp_discrete": VPDiscrete(), "subvp": SubVP(), "ve": VE(), "edm": EDM()}


def gaussian(mean: torch.Tensor, std: float) -> GaussianMixture:
    return GaussianMixture(mean[None], torch.tensor([std]), torch.ones(1))


def diffused_variance(schedule, t: torch.Tensor, std: float) -> torch.Tensor:
    return schedule.alpha(t) ** 2 * std**2 + schedule.sigma(t) ** 2


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_reverse_sde_samples_have_the_targets_mean_and_variance(name):
    """Euler-Maruyama on ``dz = (a z + 2 c s(z)) dt + sqrt(2 c) dW`` with the exact score
    ``s = -(z - alpha mu) / V`` is linear, so from z0 ~ N(alpha_0 mu, V_0 I) its iterates
    stay Gaussian with ``m' = m + h (a m - 2 c (m - alpha mu) / V)`` and
    ``v' = (1 + h (a - 2 c / V))^2 v + 2 c h``: the end samples' mean and variance (pooled
    over 8 coordinates of 4000 paths) must match these to 4 standard errors (3.2% for the
    variance), which a noise scale off by 1.1x (variance 20% off here) misses by far. The recursion in
    turn lands within the step's bias (3%) of the continuous law, alpha_1 mu and V_1."""
    schedule, d, n, std = SCHEDULES[name], 8, 4000, 0.5
    mu = torch.linspace(-1, 1, d)
    model = MixtureScore(gaussian(mu, std), schedule)
    s = solver_settings_with(method="sde", num_steps=200, spacing="log_snr", density="closed_form", progress=False)
    times = s.times(schedule)
    z0 = model.sample_base(n, (d,), times[0], torch.Generator().manual_seed(0))
    out = Integrator(model, s).run(z0).samples

    co = schedule.coefficients(times)
    mean, var, gain = co.alpha[0] * mu, diffused_variance(schedule, times[0], std), torch.tensor(1.0)
    for k in range(len(times) - 1):
        h, v_k = times[k + 1] - times[k], diffused_variance(schedule, times[k], std)
        factor = 1 + h * (co.a[k] - 2 * co.c[k] / v_k)
        mean = mean + h * (co.a[k] * mean - 2 * co.c[k] * (mean - co.alpha[k] * mu) / v_k)
        var, gain = factor**2 * var + 2 * co.c[k] * h, gain * factor
    # The start's own sampling error passes through the linear map (times ``gain``):
    # compare like with like, so that what is left is the noise's sampling error.
    start = diffused_variance(schedule, times[0], std)
    noise = var - gain**2 * start
    mean_error = (out.mean(0) - mean - gain * (z0.mean(0) - co.alpha[0] * mu)).abs().max()
    assert mean_error < 4 * (noise / n).sqrt(), (mean_error, noise)
    expected = var + gain**2 * (z0.var(0).mean() - start)
    assert abs(out.var(0).mean() / expected - 1) < 4 * math.sqrt(2 / (n * d)), (out.var(0).mean(), expected)
    end = diffused_variance(schedule, times[-1], std)
    assert abs(var / end - 1) < 0.03 and (mean - co.alpha[-1] * mu).abs().max() < 0.03 * end.sqrt()


def _flow_problem(d: int = 3):
    g = torch.Generator().manual_seed(1)
    mu, mu_nu, std = torch.tensor([1.0, -0.5, 0.2])[:d], torch.tensor([0.3, 0.4, -0.6])[:d], 0.4
    schedule = VPLinear()
    model = MixtureScore(gaussian(mu, std), schedule)
    z0 = model.sample_base(16, (d,), torch.tensor(0.0), g)
    return schedule, model, z0, mu, mu_nu, std


def _exact_flow(schedule, z0, mu, mu_nu, std, t1: float):
    """End points, Jacobian factor and psi of the PF-ODE from z0 for rho = N(mu, s^2 I) and
    nu = N(mu', s^2 I): ``r_t = sqrt(V_t / V_0)``; psi solves ``psi' = (a - c / V) psi + c g``
    with ``g = w alpha (mu' - mu) / V``, ``w = nu_t / rho_t`` along the path, so
    ``psi_1 = (mu' - mu) int_0^t1 (r_1 / r_t) c_t alpha_t w_t / V_t dt`` (Simpson, 20001 points)."""
    t = torch.linspace(0, t1, 20001)
    co = schedule.coefficients(t)
    var = co.alpha**2 * std**2 + co.sigma**2
    r = (var / var[0]).sqrt()
    x = z0 - co.alpha[0] * mu  # [B, d]
    delta = mu_nu - mu
    # log w = alpha (mu' - mu).(z - alpha mu) / V - alpha^2 |mu' - mu|^2 / (2 V), z - alpha mu = r x
    log_w = ((co.alpha * r)[:, None] * (x @ delta)[None] - (co.alpha**2 * (delta @ delta) / 2)[:, None]) / var[:, None]
    integrand = ((r[-1] / r) * co.c * co.alpha / var)[:, None] * log_w.exp()  # [T, B]
    h = t[1] - t[0]
    simpson = h / 3 * (integrand[0] + integrand[-1] + 4 * integrand[1:-1:2].sum(0) + 2 * integrand[2:-1:2].sum(0))
    return co.alpha[-1] * mu + r[-1] * x, r[-1], simpson[:, None] * delta


@pytest.mark.parametrize("integrator,order", [("euler", 1), ("heun", 2)])
def test_the_pf_ode_flow_map_its_jacobian_and_psi_match_the_gaussian_closed_form(integrator, order):
    """Samples, the flow map's Jacobian (psi0 = I) and psi toward nu against the closed form
    of ``_exact_flow``: each error falls at the rule's order as the steps halve (so the
    limit is the closed form: a wrong one would stall the rate), and Heun's is 3e-4 or less
    relative at 160 steps (4e-4 allowed)."""
    schedule, model, z0, mu, mu_nu, std = _flow_problem()
    t1 = 0.99
    exact_samples, factor, exact_psi = _exact_flow(schedule, z0, mu, mu_nu, std, t1)
    errors = []
    for n in (40, 80, 160):
        s = solver_settings_with(integrator=integrator, num_steps=n, t_min=1 - t1, density="closed_form",
                                 progress=False)
        integ = Integrator(model, s, Perturbation([gaussian(mu_nu, std)]))
        out = integ.run(z0)
        jac = Integrator(model, s).run(z0, psi0=torch.eye(3)[:, None].expand(3, 16, 3).clone()).psi
        errors.append([((out.samples - exact_samples).norm(dim=1) / exact_samples.norm(dim=1)).max().item(),
                       (jac - factor * torch.eye(3)[:, None]).abs().max().item() / factor.item(),
                       ((out.psi[0] - exact_psi).norm(dim=1) / exact_psi.norm(dim=1)).max().item()])
    errors = torch.tensor(errors)
    rates = (errors[:-1] / errors[1:]).log2()
    assert ((rates > order - 0.3) & (rates < order + 0.4)).all(), (errors, rates)
    if integrator == "heun":
        assert (errors[-1] < 4e-4).all(), errors


def test_ccov_with_hutchinson_probes_errs_by_the_variance_the_probes_predict():
    """The CCoV log-density from Gaussian probes minus the exact-trace one is, per path,
    ``-sum_k h c_k (mean of the probes' e^T J e - tr J)``: mean zero, variance
    ``sum_k (h c_k)^2 2 |J_k|_F^2 / H`` (the score's Jacobian is symmetric). Over 400 probe
    draws (the same path, keyed as 400 samples) the mean is within 4 standard errors of the
    exact-trace value and the variance within the chi-square band of the prediction."""
    d, draws, probes = 4, 400, 2
    rho = GaussianMixture(torch.stack([-torch.ones(d), torch.ones(d)]), torch.tensor([0.5, 0.5]), torch.ones(2))
    model = MixtureScore(rho, VPLinear())
    z0 = model.sample_base(3, (d,), torch.tensor(0.0), torch.Generator().manual_seed(2))
    s = solver_settings_with(num_steps=30, t_min=0.05, density="ccov", divergence="exact", probe="gaussian",
                             progress=False)  # Rademacher's variance would be 2 (|J|_F^2 - sum J_ii^2) / H
    exact = Integrator(model, s, tape=True).run(z0)
    s.divergence, s.hutchinson_samples = "hutchinson", probes
    copies = z0.repeat(draws, 1)  # row b + 3 r: path b, probe draw r
    noisy = Integrator(model, s, track_density=True).run(copies, sample_ids=torch.arange(3 * draws)).logp
    error = (noisy - exact.logp.repeat(draws)).view(draws, 3)
    torch.testing.assert_close(Integrator(model, s, track_density=True).run(copies[:3]).samples, exact.samples)

    times = s.times(model.schedule)
    co = model.schedule.coefficients(times)
    predicted = torch.zeros(3)
    eye = torch.eye(d)[:, None].expand(d, 3, d)
    for k, z in zip(exact.tape.index, exact.tape.z, strict=True):
        _, cols = model.score_and_jvp(z, times[k], eye)  # [d, B, d]: the Jacobian's columns
        h = times[k + 1] - times[k]
        predicted += (h * co.c[k]) ** 2 * 2 * cols.pow(2).sum((0, 2)) / probes
    assert (error.mean(0).abs() < 4 * (predicted / draws).sqrt()).all(), (error.mean(0), predicted)
    ratio = error.var(0) / predicted
    band = 4 * math.sqrt(2 / (draws - 1))
    assert ((ratio > 1 - band) & (ratio < 1 + band)).all(), ratio
