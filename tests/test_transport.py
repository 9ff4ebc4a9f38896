"""Entropic-OT transport rays against exact limits and an independent log-domain Sinkhorn."""

import math

import pytest
import torch

from diffsens_cli.core.transport import transport_rays


def reference_rays(x, y, reg, metric, b=None):
    """Hand-written log-domain Sinkhorn in torch float64 (no POT): returns rays [N, D] and
    the cost maximum. Alternates exact row / column updates of the dual potentials f, g."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    c = torch.cdist(x, y) ** (2 if metric == "sqeuclidean" else 1)
    scale = c.max()
    c = c / scale
    log_a = torch.full((len(x),), -math.log(len(x)), dtype=torch.float64)
    log_b = torch.full((len(y),), -math.log(len(y)), dtype=torch.float64) if b is None else (b / b.sum()).log()
    f, g = torch.zeros(len(x), dtype=torch.float64), torch.zeros(len(y), dtype=torch.float64)
    for _ in range(10_000):
        g = reg * log_b - reg * torch.logsumexp((f[:, None] - c) / reg, 0)
        f = reg * log_a - reg * torch.logsumexp((g[None, :] - c) / reg, 1)
        p = torch.exp((f[:, None] + g[None, :] - c) / reg)
        if (p.sum(0) / log_b.exp() - 1).abs().max() < 1e-14:
            break
    return p @ y / p.sum(1, keepdim=True) - x, scale.item()


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_permutation_is_the_transport_map(metric):
    # Six points 14 apart, targets a permutation of them moved by about 0.01. After normalising,
    # matched costs are < 0.01 and unmatched ones about 1, so with reg 0.01 every off-permutation
    # entry of P is below ~exp(-90) of its row: the rays are y[perm[i]] - x[i] to rounding.
    g = torch.Generator().manual_seed(0)
    x = 10 * torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    y = torch.empty_like(x)
    y[perm] = x + 0.01 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    out = transport_rays(x, y, reg=0.01, metric=metric)
    torch.testing.assert_close(out.rays, y[perm] - x, rtol=0, atol=1e-6)
    assert out.marginal_error < 1e-6


def test_large_reg_gives_independent_coupling():
    # At large reg, P_ij / sum_j P_ij = exp((g_j - C_ij)/reg) / sum_k exp((g_k - C_ik)/reg), with
    # normalised costs in [0, 1] and potentials g whose spread is at most 1, so each weight lies
    # within a factor exp(+-2/reg) of 1/M and |ray_i - (mean(y) - x_i)| <= (2/reg) max|y| (about
    # 1e-5 here). At reg 0.05 the rays are far from this closed form (checked as a control).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64) + 2.0
    reg = 1e6
    expected = y.mean(0) - x
    out = transport_rays(x, y, reg=reg)
    torch.testing.assert_close(out.rays, expected, rtol=0, atol=2.1 / reg * y.abs().max().item())
    assert (transport_rays(x, y).rays - expected).abs().max() > 0.1


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_matches_reference_sinkhorn_on_images(metric):
    # Image-shaped inputs [N, 1, 4, 4]: the rays come back image-shaped and agree with the
    # flattened reference. Both solvers run to marginal errors < 1e-9, which moves the
    # barycentres (coordinates of order 1) by far less than the 1e-8 tolerance.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) + 0.5
    rays, scale = reference_rays(x, y, 0.05, metric)
    out = transport_rays(x, y, reg=0.05, metric=metric)
    assert out.rays.shape == (7, 1, 4, 4)
    torch.testing.assert_close(out.rays.flatten(1), rays, rtol=0, atol=1e-8)
    assert out.cost_scale == pytest.approx(scale, rel=1e-12)
    assert out.marginal_error < 1e-6

    # float32 in, float32 out, and the same float64 computation underneath.
    out32 = transport_rays(x.float(), y.float(), metric=metric)
    assert out32.rays.dtype == torch.float32
    assert torch.equal(out32.rays, transport_rays(x.float().double(), y.float().double(), metric=metric).rays.float())


def test_weighted_targets_match_the_reference():
    # The retraining target (1 - eta) rho + eta S weighs two point sets unequally.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 4, generator=g, dtype=torch.float64)
    b = torch.tensor([0.9 / 6] * 6 + [0.1 / 3] * 3, dtype=torch.float64)
    rays, _ = reference_rays(x, y, 0.05, "euclidean", b)
    out = transport_rays(x, y, reg=0.05, target_weights=b)
    torch.testing.assert_close(out.rays, rays, rtol=0, atol=1e-8)
    assert out.marginal_error < 1e-6
    assert (out.rays - transport_rays(x, y, reg=0.05).rays).abs().max() > 1e-2  # the weights matter
    with pytest.raises(ValueError, match="target_weights"):
        transport_rays(x, y, target_weights=-b)


def test_bad_arguments():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="metric"):
        transport_rays(x, x, metric="cityblock")
    for reg in [0.0, -1.0, float("nan")]:
        with pytest.raises(ValueError, match="reg"):
            transport_rays(x, x, reg=reg)
