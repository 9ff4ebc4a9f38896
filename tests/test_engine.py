"""The engine against exact answers: Eq. 1 against finite differences of the mixture
score, Eq. 2 against finite differences of the perturbed flow, CCoV and Hutchinson
against closed-form densities and traces."""

import math

import pytest
import torch
from helpers import solver_settings_with, watch_chunks

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.core.score_sensitivity import WeightStats, score_sensitivity

pytestmark = pytest.mark.usefixtures("float64_default")
SCHED = VPLinear()


def two_gaussians(d=10, std=0.1):
    means = torch.stack([-torch.ones(d), torch.ones(d)])
    return GaussianMixture(means, torch.tensor([std, std]), torch.tensor([0.5, 0.5]))


def gaussian(center, d=10, std=0.1):
    return GaussianMixture(torch.full((1, d), float(center)), torch.tensor([std]), torch.ones(1))


def test_score_sensitivity_matches_central_finite_difference_in_eta():
    """g_t = d/deta s^eta_t at eta=0 (Theorem 3.1), by a central difference of the
    score of (1-eta) rho_t + eta nu_t built from the two log-densities and autograd, at
    points where nu_t/rho_t ranges from ~1e-30 to ~1e+30."""
    d = 10
    rho, nu = two_gaussians(d), gaussian(0.3, d, std=0.2)
    g = torch.Generator().manual_seed(0)
    ratios = []
    for t in (0.2, 0.6, 0.9, 0.99):
        alpha, sigma = SCHED.alpha(torch.tensor(t)), SCHED.sigma(torch.tensor(t))
        z = torch.cat([rho.sample_diffused(20, alpha, sigma, g), nu.sample_diffused(20, alpha, sigma, g)])
        r, n = rho.diffused(z, alpha, sigma), nu.diffused(z, alpha, sigma)
        gt = score_sensitivity(n.log_density, n.score, r.log_density, r.score)
        log_ratio = n.log_density - r.log_density
        ratios.append(log_ratio)

        def log_mix(x, eta):  # log((1 - eta) rho_t + eta nu_t), valid for |eta| < 1/(1 + ratio)
            lr, ln = rho.diffused(x, alpha, sigma).log_density, nu.diffused(x, alpha, sigma).log_density
            return lr + torch.log1p(eta * torch.expm1(ln - lr))

        def score_at(eta):
            x = z.clone().requires_grad_()
            return torch.autograd.grad(log_mix(x, eta).sum(), x)[0]

        # eta per point, small against 1/ratio so the Taylor error stays ~ (eta*ratio)^2.
        eta = (1e-4 / (1 + log_ratio.exp()))[:, None]
        fd = (score_at(eta[:, 0]) - score_at(-eta[:, 0])) / (2 * eta)
        # Tolerance: relative 1e-5, plus the difference's round-off ~ eps |s| / eta, which
        # is all a finite difference can resolve where nu_t/rho_t is tiny.
        roundoff = 1e-13 * r.score.norm(dim=1, keepdim=True) / eta
        assert ((fd - gt).norm(dim=1, keepdim=True) <= 1e-5 * gt.norm(dim=1, keepdim=True) + roundoff).all()
        resolved = gt.norm(dim=1) > 1e3 * roundoff[:, 0]
        assert resolved.sum() >= 20  # most points are checked to 1e-5 relative
    ratios = torch.cat(ratios)
    assert ratios.min() < math.log(1e-30) and ratios.max() > math.log(1e30)


def test_weight_clamp_and_nonfinite_are_counted():
    stats = WeightStats()
    log_nu = torch.tensor([0.0, 10.0, -10.0, 0.0, math.inf])
    log_rho = torch.tensor([0.0, 0.0, 0.0, -math.inf, 0.0])
    g = score_sensitivity(log_nu, torch.ones(5, 2), log_rho, torch.zeros(5, 2), clamp=(0.1, 10.0), stats=stats)
    torch.testing.assert_close(g[:, 0], torch.tensor([1.0, 10.0, 0.1, 0.0, 0.0]))
    assert stats.as_dict() == {"evaluated": 5, "clamped_low": 1, "clamped_high": 1, "nonfinite": 2, "underflow": 0,
                               "overflow": 0}


@pytest.mark.parametrize("dtype,underflow,overflow", [(torch.float32, 4, 1), (torch.float64, 2, 0)])
def test_weights_that_underflow_or_overflow_the_working_dtype_are_counted(dtype, underflow, overflow):
    """exp of a finite log weight is 0 below the smallest subnormal (float32: 2^-149 = e^-103.3,
    float64: 2^-1074 = e^-744.4) and inf above the largest value (e^88.7, e^709.8): of the log
    weights -50, -120, -200, 100, -1000, float32 loses -120, -200, -1000 to 0 and 100 to inf;
    float64 only -1000.  log nu = -inf underflows in both: nu_t, a Gaussian smoothing, is
    positive everywhere, so its log is -inf only when it overflowed."""
    log_nu = torch.tensor([-50.0, -120.0, -200.0, 100.0, -1000.0, -math.inf], dtype=dtype)
    stats = WeightStats()
    g = score_sensitivity(log_nu, torch.ones(6, 2, dtype=dtype), torch.zeros(6, dtype=dtype),
                          torch.zeros(6, 2, dtype=dtype), stats=stats)
    assert stats.as_dict() == {"evaluated": 6, "clamped_low": 0, "clamped_high": 0, "nonfinite": 0,
                               "underflow": underflow, "overflow": overflow}
    assert g[0, 0].item() == pytest.approx(math.exp(-50.0), rel=1e-6)
    assert (g[4:] == 0).all() and ((g[1:3] == 0).all() == (dtype == torch.float32))


def test_a_zero_weight_times_a_score_that_overflowed_is_zero_not_nan():
    """nu's score inf or NaN where its weight is 0 (its log-density overflowed to -inf, as for a
    mean far beyond the data's scale): g_t is 0 there, not 0 * inf = NaN, and the weight counts
    as an underflow; where the weight is positive an infinite score stays infinite."""
    stats = WeightStats()
    log_nu = torch.tensor([-math.inf, -math.inf, 0.0])
    s_nu = torch.tensor([[math.inf, 1.0], [math.nan, 1.0], [math.inf, 1.0]])
    g = score_sensitivity(log_nu, s_nu, torch.zeros(3), torch.zeros(3, 2), stats=stats)
    assert (g[:2] == 0).all() and g[2, 0] == math.inf and g[2, 1] == 1.0
    assert stats.as_dict() == {"evaluated": 3, "clamped_low": 0, "clamped_high": 0, "nonfinite": 0,
                               "underflow": 2, "overflow": 0}


def test_underflow_counts_survive_chunking_and_say_why_psi_is_zero():
    """nu 1e4 away from rho: every weight along every path underflows (log nu_t/rho_t is about
    -d (1e4 alpha_t)^2 / (2 sigma_t^2), below -8000 already at t = 0 where alpha = 0.0066), so
    psi is exactly zero and every one of 12 paths x 10 steps is counted, across 3 chunks."""
    rho = two_gaussians(d=4).to(torch.device("cpu"), torch.float32)
    nu = gaussian(1e4, d=4, std=1e-3).to(torch.device("cpu"), torch.float32)
    z0 = torch.randn(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    s = solver_settings_with(num_steps=10, density="closed_form", progress=False, batch_size=5)
    res = Integrator(MixtureScore(rho, SCHED), s, Perturbation([nu])).run(z0)
    assert (res.psi[0] == 0).all()
    assert res.weights[0].as_dict() == {"evaluated": 120, "clamped_low": 0, "clamped_high": 0, "nonfinite": 0,
                                     "underflow": 120, "overflow": 0}


def _setup(d=10, n=64, seed=0):
    rho, nu = two_gaussians(d), gaussian(1.0, d)
    gen = torch.Generator().manual_seed(seed)
    z0 = MixtureScore(rho, SCHED).sample_base(n, (d,), torch.tensor(0.0), gen)
    return rho, nu, z0


def _remainders(settings, etas, d=10):
    rho, nu, z0 = _setup(d)
    res = Integrator(MixtureScore(rho, SCHED), settings, Perturbation([nu])).run(z0)
    out = []
    for eta in etas:
        pert = Integrator(MixtureScore(rho.mix(nu, eta), SCHED), settings).run(z0).samples
        rem = pert - res.samples - eta * res.psi[0]
        out.append((rem.norm(dim=1) / eta).median().item())
    return res, torch.tensor(out)


@pytest.mark.parametrize("method,integrator", [("ode", "euler"), ("ode", "heun"), ("sde", "euler")])
def test_sample_sensitivity_is_the_derivative_of_the_discrete_flow(method, integrator):
    """With exact densities, the fused scheme is the exact eta-derivative of the discrete
    solution map (same Wiener increments for the SDE): R(eta)/eta falls like eta."""
    s = solver_settings_with(method=method, integrator=integrator, num_steps=100, density="closed_form", progress=False)
    etas = [1e-1, 1e-2, 1e-3, 1e-4]
    res, r = _remainders(s, etas)
    assert res.psi[0].norm(dim=1).median() > 1e-3
    slopes = (r[:-1] / r[1:]).log10()
    assert (slopes > 0.8).all() and (slopes < 1.2).all(), r
    assert r[-1] < 1e-3 * res.psi[0].norm(dim=1).median()


def test_sde_sensitivity_needs_the_drift_not_the_velocity():
    """The paper's text uses Eq. 2 (the velocity: forcing c g) unchanged along SDE paths;
    for a fixed noise realisation the derivative is driven by the SDE drift (2 c g)
    instead, and only that version matches the finite difference (docs/design.md section 5)."""
    rho, nu, z0 = _setup()
    s = solver_settings_with(method="sde", num_steps=100, density="closed_form", progress=False)
    base = Integrator(MixtureScore(rho, SCHED), s, Perturbation([nu])).run(z0)
    pert = Integrator(MixtureScore(rho.mix(nu, 1e-5), SCHED), s).run(z0).samples
    fd = (pert - base.samples) / 1e-5
    s.sde_sensitivity = "velocity"
    literal = Integrator(MixtureScore(rho, SCHED), s, Perturbation([nu])).run(z0).psi[0]
    err_drift = ((fd - base.psi[0]).norm(dim=1) / fd.norm(dim=1)).median()
    err_literal = ((fd - literal).norm(dim=1) / fd.norm(dim=1)).median()
    assert err_drift < 1e-3 and err_literal > 0.05, (err_drift, err_literal)


def test_ccov_log_density_converges_to_exact_density():
    """log rho_t(z_t) by CCoV with the exact trace against the closed-form density at
    the path's end; the error falls with the step size (first order), and it is the
    step's alone: extrapolated to h -> 0 (Richardson, 2 e_200 - e_100) it is within 5% of
    the 100-step error (2% measured; the errors are 1.03, 0.49 and 0.24 nats)."""
    rho, _, z0 = _setup(d=5, n=32)
    model = MixtureScore(rho, SCHED)
    errs = []
    for n in (50, 100, 200):
        s = solver_settings_with(num_steps=n, density="ccov", divergence="exact", progress=False)
        res = Integrator(model, s, track_density=True).run(z0)
        exact = model.log_density(res.samples, torch.tensor(s.grid()[1]))
        errs.append((res.logp - exact).abs().median().item())
    assert errs[0] / errs[1] > 1.7 and errs[1] / errs[2] > 1.7, errs  # first order
    assert abs(2 * errs[2] - errs[1]) < 0.05 * errs[1], errs


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased_for_the_trace(probe):
    """The mean over many probes of e^T (J s) e against the exact trace."""
    rho = two_gaussians(d=20)
    model = MixtureScore(rho, SCHED)
    t = torch.tensor(0.8)
    z = torch.randn(4, 20)
    s = solver_settings_with(hutchinson_samples=4000, probe=probe, density="ccov", progress=False)
    integ = Integrator(model, s, track_density=True)
    probes = integ._probes(z, torch.arange(4), step=0, replicas=1)
    _, jp = model.score_and_jvp(z, t, probes)
    est = (probes * jp).sum(-1)  # [h, B]
    exact = model.score_trace(z, t)
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() < 4 * stderr + 1e-9).all()  # Rademacher is exact where J s ~ c I


def test_chunked_integration_equals_one_batch_and_survives_out_of_memory(monkeypatch):
    """Chunks are independent (ODE, exact trace): any chunking gives the same result; an
    out-of-memory error in an automatically sized chunk halves it and carries on."""
    rho, nu, z0 = _setup(d=6, n=40)
    s = solver_settings_with(num_steps=30, density="ccov", divergence="exact", progress=False)
    model = MixtureScore(rho, SCHED)
    whole = Integrator(model, s, Perturbation([nu])).run(z0)
    s.batch_size = 7
    chunked = Integrator(model, s, Perturbation([nu])).run(z0)
    for a, b in [(whole.samples, chunked.samples), (whole.psi[0], chunked.psi[0]), (whole.logp, chunked.logp)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert chunked.weights[0].total == whole.weights[0].total

    s.batch_size = None
    integ = Integrator(model, s, Perturbation([nu]))
    sizes = watch_chunks(monkeypatch, integ, lambda state: state.z.shape[0], fail_above=10)
    out = integ.run(z0)
    assert sizes[:4] == [40, 20, 10, 10] and max(sizes[2:]) <= 10
    torch.testing.assert_close(out.psi[0], whole.psi[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, density", [("ode", "ccov"), ("sde", "closed_form")])
def test_on_a_cpu_chunks_stay_within_the_models_cpu_chunk_bytes_and_change_nothing(monkeypatch, method, density):
    """A closed-form model caps automatic chunks on a CPU (cache-sized chunks run faster);
    the capped run, with Hutchinson probes (ODE) or Wiener increments (SDE), equals one
    batch bit for bit."""
    rho, nu, z0 = _setup(d=6, n=40)
    s = solver_settings_with(method=method, num_steps=20, density=density, divergence="hutchinson",
                             hutchinson_samples=3, progress=False, batch_size=40)
    model = MixtureScore(rho, SCHED)
    whole = Integrator(model, s, Perturbation([nu])).run(z0)
    s.batch_size = None
    integ = Integrator(model, s, Perturbation([nu]))
    assert integ._chunk_sizes(z0, 1, 1)[0] == 40  # 32 MiB hold every row
    monkeypatch.setattr(model, "cpu_chunk_bytes", 1)
    assert integ._chunk_sizes(z0, 1, 1)[0] == 1
    lo, hi = 1, 1 << 30
    while lo < hi:  # the smallest cap that gives 9 rows
        mid = (lo + hi) // 2
        monkeypatch.setattr(model, "cpu_chunk_bytes", mid)
        lo, hi = (mid + 1, hi) if integ._chunk_sizes(z0, 1, 1)[0] < 9 else (lo, mid)
    monkeypatch.setattr(model, "cpu_chunk_bytes", lo)
    sizes = watch_chunks(monkeypatch, integ, lambda state: state.z.shape[0])
    capped = integ.run(z0)
    assert sizes == [9, 9, 9, 9, 4]
    assert (whole.logp is None) == (method == "sde")  # closed-form densities are not integrated
    pairs = [(whole.samples, capped.samples), (whole.psi[0], capped.psi[0])]
    for a, b in pairs + ([(whole.logp, capped.logp)] if method == "ode" else []):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_a_family_of_etas_in_one_batch_equals_one_run_per_eta(method):
    """rho.mix(nu, [eta_1..eta_R]) integrated as R replicas of z0 (chunked, too) gives
    each eta's own run: same paths, same Wiener increments."""
    rho, nu, z0 = _setup(d=6, n=12)
    etas = [0.5, 0.1, 1e-3]
    s = solver_settings_with(method=method, num_steps=40, density="closed_form", progress=False, batch_size=5)
    family = Integrator(MixtureScore(rho.mix(nu, etas), SCHED), s).run(z0.repeat(len(etas), 1), replicas=len(etas))
    for r, eta in enumerate(etas):
        single = Integrator(MixtureScore(rho.mix(nu, eta), SCHED), s).run(z0)
        torch.testing.assert_close(family.samples[r * 12:(r + 1) * 12], single.samples, rtol=1e-12, atol=1e-12)
