"""Closed-form mixture scores, JVPs and traces against autograd and full Jacobians."""


import pytest
import torch

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.models.network import FourierMLP, NetworkScore

pytestmark = pytest.mark.usefixtures("float64_default")


def mixture(d=5, k=4, seed=0, std=True):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g)
    stds = torch.rand(k, generator=g) * 0.5 if std else torch.zeros(k)
    weights = torch.rand(k, generator=g) + 0.1
    return GaussianMixture(means, stds, weights)


def reference_log_density(m: GaussianMixture, z, alpha, sigma):
    """Direct per-component evaluation with torch.distributions (no shared code)."""
    comps = []
    for mu, sd, lw in zip(m.means, m.stds, m.log_weights):
        var = alpha**2 * sd**2 + sigma**2
        dist = torch.distributions.MultivariateNormal(alpha * mu, var * torch.eye(m.dim))
        comps.append(lw + dist.log_prob(z))
    return torch.logsumexp(torch.stack(comps), 0)


@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_log_density_score_jvp_trace_against_autograd(std, chunk):
    m = mixture(std=std)
    m.chunk_size = chunk
    alpha, sigma = torch.tensor(0.8), torch.tensor(0.6)
    z = torch.randn(7, m.dim, generator=torch.Generator().manual_seed(1)) * 1.5
    v = torch.randn(3, 7, m.dim, generator=torch.Generator().manual_seed(2))
    st = m.diffused(z, alpha, sigma, tangents=v, trace=True, quadratic=v)

    ref = reference_log_density(m, z, alpha, sigma)
    torch.testing.assert_close(st.log_density, ref, rtol=1e-12, atol=1e-10)

    zr = z.clone().requires_grad_()
    grad = torch.autograd.grad(reference_log_density(m, zr, alpha, sigma).sum(), zr)[0]
    torch.testing.assert_close(st.score, grad, rtol=1e-10, atol=1e-10)

    def log_density_at(x):
        return reference_log_density(m, x[None], alpha, sigma)[0]

    hess = torch.stack([torch.autograd.functional.hessian(log_density_at, zi) for zi in z])  # [B, d, d]
    torch.testing.assert_close(st.jvp, torch.einsum("bij,nbj->nbi", hess, v), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st.trace, hess.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st.quadratic, torch.einsum("nbi,bij,nbj->nb", v, hess, v), rtol=1e-9, atol=1e-9)


def test_far_points_are_exact_in_log_space():
    """Points where every component density underflows in linear space (log-density below
    -1e5): the log-density, score, JVP and trace still equal the direct per-component
    reference (logsumexp) and its autograd derivatives."""
    m = mixture(d=50)
    z = torch.full((3, 50), 40.0) + torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    v = torch.randn(1, 3, 50, generator=torch.Generator().manual_seed(4))
    alpha, sigma = torch.tensor(1.0), torch.tensor(0.05)
    st = m.diffused(z, alpha, sigma, tangents=v, trace=True)
    ref = reference_log_density(m, z, alpha, sigma)
    assert ref.max() < -1e5 and torch.exp(ref).max() == 0  # underflows in linear space
    torch.testing.assert_close(st.log_density, ref, rtol=1e-12, atol=0)
    zr = z.clone().requires_grad_()
    grad = torch.autograd.grad(reference_log_density(m, zr, alpha, sigma).sum(), zr)[0]
    torch.testing.assert_close(st.score, grad, rtol=1e-10, atol=1e-8)
    hess = torch.stack([torch.autograd.functional.hessian(lambda x: reference_log_density(m, x[None], alpha, sigma)[0],
                                                          zi) for zi in z])
    torch.testing.assert_close(st.jvp, torch.einsum("bij,nbj->nbi", hess, v), rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(st.trace, hess.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("eta", [0.25, [0.5, 1e-3, 0.9]])
def test_mix_weights_and_densities(eta):
    """``a.mix(b, eta)``: weights (1 - eta) w_a and eta w_b, one row per eta of a family, and
    each group of points has the density (1 - eta) a_t + eta b_t of its own eta."""
    a, b = mixture(k=2), mixture(k=3, seed=5)
    mixed = a.mix(b, eta)
    etas = torch.atleast_1d(torch.tensor(eta, dtype=torch.float64))
    w = mixed.log_weights.exp().reshape(len(etas), 5)
    torch.testing.assert_close(w[:, :2], (1 - etas[:, None]) * a.log_weights.exp(), rtol=1e-12, atol=0)
    torch.testing.assert_close(w[:, 2:], etas[:, None] * b.log_weights.exp(), rtol=1e-12, atol=0)
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha, sigma = torch.tensor(0.8), torch.tensor(0.6)
    got = mixed.diffused(z.repeat(len(etas), 1), alpha, sigma).log_density.view(len(etas), 4)
    la, lb = a.diffused(z, alpha, sigma).log_density, b.diffused(z, alpha, sigma).log_density
    expected = torch.log((1 - etas[:, None]) * la.exp() + etas[:, None] * lb.exp())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_default_vmapped_jvp_matches_closed_form_and_finite_difference():
    """The generic torch.func path (used by neural models) against the exact closed form,
    and a neural model's JVP against a central finite difference."""
    sched = VPLinear()
    exact = MixtureScore(mixture(), sched)
    t = torch.tensor(0.7)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, generator=g)
    v = torch.randn(2, 6, 5, generator=g)
    s_ref, j_ref = exact.score_and_jvp(z, t, v)
    s, j = super(MixtureScore, exact).score_and_jvp(z, t, v)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(j, j_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(super(MixtureScore, exact).score_trace(z, t), exact.score_trace(z, t))
    generic = super(MixtureScore, exact).score_with_derivatives(z, t, v[:2], v)
    for a, b in zip(generic, exact.score_with_derivatives(z, t, v[:2], v)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    net = NetworkScore(FourierMLP(5, hidden=32, num_frequencies=16).double(), sched)
    s, j = net.score_and_jvp(z, t, v)
    h = 1e-4  # fourth-order central difference: measured error falls as h^4, 6e-10 here

    def fd(vi):
        f = lambda a: net.score(z + a * h * vi, t)  # noqa: E731
        return (-f(2) + 8 * f(1) - 8 * f(-1) + f(-2)) / (12 * h)

    torch.testing.assert_close(j, torch.stack([fd(vi) for vi in v]), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(s, net.score(z, t))


def test_base_distribution_samples_and_density():
    """Networks start from N(0, sigma_t0^2 I); closed-form models from their exact rho_t0:
    sample moments against the mixture's (CLT bound), densities against closed forms."""
    sched, t0 = VPLinear(), torch.tensor(0.2)  # t0 > 0 so that alpha X matters
    g = torch.Generator().manual_seed(0)
    net = NetworkScore(FourierMLP(3, hidden=8, num_frequencies=4).double(), sched)
    z = net.sample_base(5, (3,), t0, g)
    ref = torch.distributions.Normal(0.0, sched.sigma(t0)).log_prob(z).sum(-1)
    torch.testing.assert_close(net.base_log_density(z, t0), ref)

    m = mixture(d=3, k=2)
    exact = MixtureScore(m, sched)
    n = 200_000
    x = exact.sample_base(n, (3,), t0, g)
    w, a, s = m.log_weights.exp(), sched.alpha(t0), sched.sigma(t0)
    mean = a * (w[:, None] * m.means).sum(0)
    second = (w[:, None] * (a**2 * (m.means**2 + m.stds[:, None] ** 2))).sum(0) + s**2
    var = second - mean**2
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((x.var(0) - var).abs() / var < 0.02).all()
    torch.testing.assert_close(exact.base_log_density(x[:4], t0), exact.log_density(x[:4], t0))
