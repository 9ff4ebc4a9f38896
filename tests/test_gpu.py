"""The CUDA path against the CPU path (run with `make test-gpu` on a GPU machine)."""

import pytest
import torch
from helpers import influence_settings_with, solver_settings_with

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.models.network import FourierMLP, NetworkScore

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SCHED = VPLinear()


def _problem(device, dtype, d=20, n=256):
    means = torch.stack([-torch.ones(d), torch.ones(d)])
    rho = GaussianMixture(means, torch.tensor([0.1, 0.1]), torch.tensor([0.5, 0.5])).to(device, dtype)
    nu = GaussianMixture.empirical(torch.randn(50, d, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    z0 = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return rho, nu, z0


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_closed_form_cuda_matches_cpu(method):
    """Same paths and psi on both devices in float64: the keyed Wiener increments are the
    same numbers on every device (``keyed_random``), so the SDE compares too; on each
    device the SDE's psi is also the derivative of its samples (a finite difference in eta)."""
    out = {}
    for dev in ("cpu", "cuda"):
        rho, nu, z0 = _problem(dev, torch.float64)
        s = solver_settings_with(method=method, num_steps=200, density="closed_form", progress=False)
        out[dev] = Integrator(MixtureScore(rho, SCHED), s, Perturbation([nu])).run(z0)
        if method == "sde":
            eta = 1e-5
            pert = Integrator(MixtureScore(rho.mix(nu, eta), SCHED), s).run(z0).samples
            fd = (pert - out[dev].samples) / eta
            rel = ((fd - out[dev].psi[0]).norm(dim=1) / fd.norm(dim=1).clamp_min(1e-12)).median()
            assert rel < 1e-3
    torch.testing.assert_close(out["cuda"].psi, out["cpu"].psi, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["cuda"].samples, out["cpu"].samples, rtol=1e-10, atol=1e-10)


def test_network_jvp_on_cuda_matches_finite_difference_and_cpu():
    net = FourierMLP(20, hidden=64, num_frequencies=32)
    z = torch.randn(64, 20, dtype=torch.float64)
    v = torch.randn(3, 64, 20, dtype=torch.float64)
    t = torch.tensor(0.6, dtype=torch.float64)
    results = {}
    for dev in ("cpu", "cuda"):
        model = NetworkScore(net.to(dev, torch.float64), SCHED)
        s, j = model.score_and_jvp(z.to(dev), t.to(dev), v.to(dev))
        eps = 1e-6
        fd = torch.stack([(model.score(z.to(dev) + eps * vi, t.to(dev)) - model.score(z.to(dev) - eps * vi, t.to(dev)))
                          / (2 * eps) for vi in v.to(dev)])
        torch.testing.assert_close(j, fd, rtol=1e-5, atol=1e-6)
        results[dev] = j.cpu()
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_fused_sensitivity_run_on_cuda_float32(divergence):
    """A neural model, CCoV with the exact trace or with Hutchinson probes (the same keyed
    probes on both devices), float32 on the GPU: psi matches the float64 CPU run."""
    net = FourierMLP(20, hidden=64, num_frequencies=32)
    psis = {}
    for dev, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        rho, nu, z0 = _problem(dev, dtype)
        model = NetworkScore(net.to(dev, dtype), SCHED)
        s = solver_settings_with(num_steps=100, density="ccov", divergence=divergence, hutchinson_samples=2,
                                 progress=False)
        res = Integrator(model, s, Perturbation([nu])).run(z0)
        assert torch.isfinite(res.psi[0]).all() and res.weights[0].as_dict()["nonfinite"] == 0
        psis[dev] = res.psi[0].double()
    rel = (psis["cuda"] - psis["cpu"]).norm(dim=1) / psis["cpu"].norm(dim=1).clamp_min(1e-12)
    assert rel.median() < 1e-3, rel.median()


def test_unet_with_attention_jvp_on_cuda_matches_cpu():
    """The forward-AD fixes on the device: the vmapped JVP of a UNet score (attention
    kept) on CUDA equals the CPU one.  The model is float64, but diffusers computes the
    timestep embedding in float32, whose sin/cos may differ between devices in the last
    bits: hence 1e-5, not float64 round-off."""
    from diffsens_cli.core.schedule import VPDiscrete
    from diffsens_cli.models.unet import build_network_model

    cfg = {"kind": "unet", "prediction": "epsilon", "block_out_channels": [8, 16], "layers_per_block": 1,
           "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
           "norm_num_groups": 4, "attention_head_dim": 4, "seed": 0}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor(0.61237, dtype=torch.float64)
    out = {}
    for dev in ("cpu", "cuda"):
        model = build_network_model(cfg, (1, 8, 8), VPDiscrete(), dtype=torch.float64)
        model.net.to(dev)
        s, j = model.score_and_jvp(z.to(dev), t.to(dev), v.to(dev))
        out[dev] = (s.cpu(), j.cpu())
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-5, atol=1e-5)


def test_influence_on_cuda_matches_cpu():
    """Per-training-point influence on the device (the closed-form empirical model, float64,
    the clamp on): the exact method's scores, and the sketch's at m = d (adjoint pass,
    vmapped VJPs, reconstructed SVD), equal the CPU's; the sketch equals exact on CUDA."""
    from diffsens_cli.core.influence import influence

    g = torch.Generator().manual_seed(0)
    points = torch.randn(40, 6, generator=g, dtype=torch.float64)
    z0 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    s = solver_settings_with(integrator="heun", num_steps=50, density="ccov", divergence="exact", progress=False,
                       weight_clamp=(0.1, 10.0))
    out = {}
    for dev in ("cpu", "cuda"):
        model = MixtureScore(GaussianMixture.empirical(points.to(dev)), SCHED)
        for method in ("exact", "sketch"):
            res = influence(model, s, points.to(dev), z0.to(dev), influence_settings_with(method=method, projections=6,
                                                                                    rank=3), [s.weight_clamp])
            out[dev, method] = (res.scores.cpu(), res.singular_values.cpu())
    for method in ("exact", "sketch"):
        for a, b in zip(out["cuda", method], out["cpu", method]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["cuda", "sketch"][0], out["cuda", "exact"][0], rtol=1e-9, atol=1e-12)


def test_influence_adjoint_through_a_unet_on_cuda_float32():
    """The reverse pass through a UNet on the device in float32 (how image runs go): the
    adjoint projections of psi^n against forward tangents, to float32 accuracy."""
    from diffsens_cli.core.forcing import EmpiricalForcing
    from diffsens_cli.core.influence import project
    from diffsens_cli.core.schedule import VPDiscrete
    from diffsens_cli.models.unet import build_network_model

    cfg = {"kind": "unet", "prediction": "epsilon", "block_out_channels": [16, 32], "layers_per_block": 1,
           "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
           "norm_num_groups": 4, "attention_head_dim": 8, "seed": 0}
    model = build_network_model(cfg, (3, 16, 16), VPDiscrete(), dtype=torch.float32)
    model.net.to("cuda")
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(2, 3, 16, 16, generator=g).cuda()
    points = (torch.rand(20, 3, 16, 16, generator=g) * 2 - 1).cuda()
    s = solver_settings_with(integrator="heun", num_steps=10, weight_clamp=(0.1, 10.0), progress=False)
    psi = Integrator(model, s, EmpiricalForcing(points)).run(z0).psi  # [N, B, 3, 16, 16]
    primal = Integrator(model, s, tape=True).run(z0)
    omega = torch.randn(4, *z0.shape, generator=g).cuda()
    projected = project(model, primal.tape, EmpiricalForcing(points), omega, [s.weight_clamp], show_progress=False)
    expected = torch.einsum("mbd,nbd->mbn", omega.flatten(2).cpu(), psi.flatten(2).cpu())
    rel = (projected[0].cpu() - expected).norm() / expected.norm()
    assert rel < 1e-4, rel


def test_training_points_streamed_from_host_memory_give_the_resident_influence():
    """influence.train_block on a GPU: the points stay in page-locked host memory and go to
    the device a block at a time; the scores of every weight clamp and the psi of chosen
    points (one tangent each, as the figures' images) match the run with all points on
    the device to float64 round-off."""
    from diffsens_cli.core.forcing import EmpiricalForcing
    from diffsens_cli.core.influence import influence

    _, _, z0 = _problem("cpu", torch.float64, d=12, n=2)
    points = torch.randn(37, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = MixtureScore(GaussianMixture.empirical(points).to("cuda", torch.float64), SCHED)
    s = solver_settings_with(num_steps=20, density="closed_form", progress=False)
    settings = influence_settings_with(projections=8, rank=3, oversample=1)
    z0 = z0.cuda()
    resident = influence(model, s, points.cuda(), z0, settings, [None, (0.1, 10.0)])
    streamed = influence(model, s, points.pin_memory(), z0, settings, [None, (0.1, 10.0)], block=8)
    torch.testing.assert_close(streamed.scores, resident.scores, rtol=1e-10, atol=1e-14)
    chosen = torch.tensor([0, 5, 36])
    on_device = Integrator(model, s, EmpiricalForcing(points.cuda(), index=chosen.cuda())).run(z0).psi
    from_host = Integrator(model, s, EmpiricalForcing(points.pin_memory(), index=chosen, block=8)).run(z0).psi
    torch.testing.assert_close(from_host, on_device, rtol=1e-10, atol=1e-14)
