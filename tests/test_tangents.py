"""K sensitivities in one pass, the flow map's Jacobian from initial tangents, random
numbers keyed by sample, results independent of how the work is split, and each
integrator's order of convergence (docs/design.md sections 5 and 9)."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
from helpers import solver_settings_with

from diffsens_cli.core import keyed_random
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPDiscrete, VPLinear, grid_times
from diffsens_cli.models.unet import build_network_model

pytestmark = pytest.mark.usefixtures("float64_default")
SCHED = VPLinear()
TINY_UNET = {"kind": "unet", "prediction": "epsilon", "layers_per_block": 1, "block_out_channels": [8, 16],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 4, "attention_head_dim": 4, "dropout": 0.0, "seed": 0}


def _problem(d: int = 6, n: int = 24, seed: int = 0):
    """rho: two Gaussians; three measures nu_k (two Gaussians and an empirical set); z0."""
    g = torch.Generator().manual_seed(seed)
    rho = GaussianMixture(torch.stack([-torch.ones(d), torch.ones(d)]), torch.tensor([0.3, 0.3]), torch.ones(2))
    nus = [GaussianMixture(torch.full((1, d), 0.5), torch.tensor([0.2]), torch.ones(1)),
           GaussianMixture(torch.randn(2, d, generator=g), torch.tensor([0.3, 0.1]), torch.ones(2)),
           GaussianMixture.empirical(torch.randn(5, d, generator=g))]
    z0 = MixtureScore(rho, SCHED).sample_base(n, (d,), torch.tensor(0.0), g)
    return rho, nus, z0


def test_keyed_normals_are_standard_normal_and_depend_on_the_key_only():
    ids = torch.arange(2000)
    x = keyed_random.normal((50,), ids, seed=3, stream=keyed_random.PROBES, step=7, dtype=torch.float64)
    n = x.numel()
    assert abs(x.mean()) < 4 / math.sqrt(n) and abs(x.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((x**4).mean() - 3) < 4 * math.sqrt(96 / n)  # the fourth moment of N(0, 1) is 3
    assert abs(torch.corrcoef(torch.stack([x[:, 0], x[:, 1]]))[0, 1]) < 4 / math.sqrt(len(ids))
    # a sample's numbers are the same whichever other samples are drawn with it
    alone = keyed_random.normal((50,), ids[[5, 1999]], seed=3, stream=keyed_random.PROBES, step=7, dtype=torch.float64)
    assert torch.equal(alone, x[[5, 1999]])
    for other in ({"seed": 4, "step": 7, "stream": keyed_random.PROBES}, {"seed": 3, "step": 8,
                  "stream": keyed_random.PROBES}, {"seed": 3, "step": 7, "stream": keyed_random.WIENER}):
        y = keyed_random.normal((50,), ids, dtype=torch.float64, **other)
        assert abs(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]) < 4 / math.sqrt(n)
    signs = keyed_random.rademacher((50,), ids, seed=3, stream=1, step=0, dtype=torch.float64)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(signs.mean()) < 4 / math.sqrt(n)


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 in plain Python integers (hash-prospector's C, masked to 32 bits)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_keyed_uniforms_and_signs_equal_a_pure_python_reference_bit_for_bit():
    """The tensor hash (int64 with products split into 16-bit halves) against plain
    Python integers, for sample ids up to 2^32 - 1 where a product would overflow int64:
    key = h(id + h(h(h(seed) + stream) + step)), word i = h(key ^ h(i)),
    uniform = (word + 1/2) / 2^32, sign = 1 - 2 (word >> 31)."""
    ids = torch.tensor([0, 1, 7, 123456, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])
    seed, stream, step, n = 12345, keyed_random.PROBES, 999, 6
    k = 0
    for part in (seed, stream, step):
        k = _lowbias32((k + part) & 0xFFFFFFFF)
    words = [[_lowbias32(_lowbias32((i + k) & 0xFFFFFFFF) ^ _lowbias32(j)) for j in range(n)] for i in ids.tolist()]
    uniforms = keyed_random.uniform((n,), ids, seed=seed, stream=stream, step=step)
    assert uniforms.tolist() == [[(w + 0.5) / 2**32 for w in row] for row in words]
    signs = keyed_random.rademacher((n,), ids, seed=seed, stream=stream, step=step, dtype=torch.float64)
    assert signs.tolist() == [[1.0 - 2 * (w >> 31) for w in row] for row in words]


def test_three_measures_in_one_pass_equal_three_separate_runs_closed_form():
    """K = 3 tangents along one path (CCoV density from a Hutchinson probe, clamped weights,
    one measure removed) against one run per measure: equal to round-off, and each
    measure keeps its own weight counts."""
    rho, nus, z0 = _problem()
    s = solver_settings_with(num_steps=40, hutchinson_samples=2, weight_clamp=(0.1, 10), progress=False)
    signs = [1.0, -1.0, 1.0]
    model = MixtureScore(rho, SCHED)
    together = Integrator(model, s, Perturbation(nus, signs)).run(z0)
    assert together.psi.shape == (3, *z0.shape)
    for k, (nu, sign) in enumerate(zip(nus, signs)):
        alone = Integrator(model, s, Perturbation([nu], [sign])).run(z0)
        torch.testing.assert_close(together.psi[k], alone.psi[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(together.logp, alone.logp, rtol=1e-12, atol=1e-12)
        assert together.weights[k].as_dict() == alone.weights[0].as_dict()
        assert together.psi[k].norm(dim=1).median() > 1e-3
    assert sum(w.as_dict()["clamped_low"] for w in together.weights) > 0  # the clamp was exercised


def test_three_measures_in_one_pass_equal_three_separate_runs_unet():
    """The same for a (tiny, untrained) UNet: one vmapped JVP over 3 tangents and a probe."""
    model = build_network_model(TINY_UNET, (1, 8, 8), VPDiscrete(), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(3, 1, 8, 8, generator=g)
    nus = [GaussianMixture.empirical(torch.rand(m, 1, 8, 8, generator=g)) for m in (2, 3, 4)]
    s = solver_settings_with(num_steps=5, weight_clamp=(0.1, 10), progress=False)
    together = Integrator(model, s, Perturbation(nus)).run(z0)
    for k, nu in enumerate(nus):
        alone = Integrator(model, s, Perturbation([nu])).run(z0)
        torch.testing.assert_close(together.psi[k], alone.psi[0], rtol=1e-10, atol=1e-10)
        assert together.weights[k].as_dict() == alone.weights[0].as_dict()
    assert together.psi.abs().sum() > 0


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_results_do_not_depend_on_how_the_work_is_split(method):
    """Hutchinson probes and Wiener increments are keyed by sample and step: three batch
    sizes, tangent chunks of 1 and 2, and a slice integrated on its own (``first_index``)
    give the same arrays."""
    rho, nus, z0 = _problem(n=30)
    density = "ccov" if method == "ode" else "closed_form"
    s = solver_settings_with(method=method, num_steps=25, density=density, weight_clamp=(0.1, 10), progress=False)
    model, pert = MixtureScore(rho, SCHED), Perturbation(nus)
    runs = [Integrator(model, replace(s, batch_size=b, tangent_batch_size=k), pert).run(z0)
            for b, k in ((30, None), (7, 1), (16, 2), (4, 3))]
    ref = runs[0]
    for out in runs[1:]:
        for a, b in [(out.samples, ref.samples), (out.psi, ref.psi)] + ([(out.logp, ref.logp)] if ref.logp is not None
                                                                       else []):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert [w.as_dict() for w in out.weights] == [w.as_dict() for w in ref.weights]
    part = Integrator(model, s, pert).run(z0[10:20], first_index=10)
    torch.testing.assert_close(part.psi, ref.psi[:, 10:20], rtol=1e-12, atol=1e-12)
    shifted = Integrator(model, s, pert).run(z0[10:20])  # the same rows keyed as samples 0-9 draw other numbers
    assert (shifted.samples - ref.samples[10:20]).abs().max() > 1e-6 or method == "ode"
    assert (shifted.psi - ref.psi[:, 10:20]).abs().max() > 1e-6


def test_identity_tangents_give_the_flow_maps_jacobian():
    """psi0 = I without a perturbation integrates the variational equation: the Jacobian
    d z1 / d z0 of the discrete flow map, against a central finite difference (Heun,
    the non-affine three-point data of the Fisher paper's Table 3)."""
    pts = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.5, 0.0]])
    model = MixtureScore(GaussianMixture.empirical(pts), SCHED)
    z0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    s = solver_settings_with(integrator="heun", num_steps=60, t_min=1e-2, density="closed_form", progress=False)
    integ = Integrator(model, s)
    jac = integ.run(z0, psi0=torch.eye(2)[:, None].expand(2, 8, 2).clone()).psi  # [j, b, i] = d z1_i / d z0_j
    h = 1e-6
    for j in range(2):
        e = torch.zeros(2)
        e[j] = h
        fd = (integ.run(z0 + e).samples - integ.run(z0 - e).samples) / (2 * h)
        torch.testing.assert_close(jac[j], fd, rtol=1e-6, atol=1e-7)
    assert (jac[0, :, 1] - jac[1, :, 0]).abs().max() > 1e-3  # not symmetric: this map is not a gradient


# num_steps is set by each use (replace)
_ORDER_BASE = solver_settings_with(density="ccov", divergence="exact", t_min=1e-2, progress=False, num_steps=1)


@functools.cache
def _order_problem():
    """The problem of the order test and its reference: Heun with 2048 steps, whose own
    error (about 5e-6 by its order) is far below the errors measured."""
    rho, nus, z0 = _problem(d=4, n=16)
    model, pert = MixtureScore(rho, SCHED), Perturbation(nus[:2])
    return model, pert, z0, Integrator(model, replace(_ORDER_BASE, integrator="heun", num_steps=2048), pert).run(z0)


@pytest.mark.parametrize("integrator,order", [("euler", 1), ("heun", 2)])
def test_each_integrator_converges_at_its_order(integrator, order):
    """The error of samples, CCoV log-densities (exact trace) and psi against a fine
    reference falls like h^p when the step halves (closed-form mixture)."""
    model, pert, z0, ref = _order_problem()
    errors = []
    for n in (40, 80, 160):
        out = Integrator(model, replace(_ORDER_BASE, integrator=integrator, num_steps=n), pert).run(z0)
        errors.append([(out.samples - ref.samples).norm(dim=-1).max().item(), (out.logp - ref.logp).abs().max().item(),
                       (out.psi - ref.psi).norm(dim=-1).max().item()])
    errors = torch.tensor(errors)
    rates = (errors[:-1] / errors[1:]).log2()  # observed order per halving, for samples, log rho and psi
    assert ((rates > order - 0.3) & (rates < order + 0.4)).all(), (errors, rates)


def test_a_log_snr_grid_is_uniform_in_log_snr_and_converges():
    """spacing=log_snr: equal steps of log(alpha^2/sigma^2), the interval's end points kept;
    psi converges to the same limit as on the uniform grid."""
    times = grid_times(SCHED, 0.0, 0.99, 50, "log_snr")
    lam = 2 * (SCHED.alpha(times).log() - SCHED.sigma(times).log())
    assert times[0] == 0.0 and times[-1] == 0.99 and (times.diff() > 0).all()
    torch.testing.assert_close(lam.diff(), torch.full((50,), (lam[-1] - lam[0]).item() / 50), rtol=1e-6, atol=0)
    model, pert, z0, ref = _order_problem()
    out = Integrator(model, replace(_ORDER_BASE, integrator="heun", num_steps=400, spacing="log_snr"), pert).run(z0)
    assert ((out.psi - ref.psi).norm(dim=-1) / ref.psi.norm(dim=-1)).max() < 1e-3
