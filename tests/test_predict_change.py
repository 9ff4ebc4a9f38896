"""What the image experiments compare: the paper's correlation, the fitted scale, and the
base samples that the sensitivity run and a plain sampling run share."""

from __future__ import annotations

import numpy as np
import torch
from helpers import solver_settings_with

from diffsens_cli.core.compare import correlation
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPDiscrete
from diffsens_cli.models.unet import build_network_model
from diffsens_cli.pipelines.predict_change import _beyond_common_shift, _comparison

TINY_UNET = {"kind": "unet", "prediction": "epsilon", "layers_per_block": 1, "block_out_channels": [8, 16],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 4, "attention_head_dim": 4, "dropout": 0.0, "seed": 0}


def test_correlation_is_numpys_corrcoef_of_the_flattened_images():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    v[1] = 2 * u[1] + 7  # an affine copy: correlation 1
    expected = [np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] for a, b in zip(u, v)]
    np.testing.assert_allclose(correlation(u, v).numpy(), expected, rtol=1e-6)
    assert abs(correlation(u, v)[1].item() - 1) < 1e-6
    assert torch.isnan(correlation(torch.ones(1, 4), torch.randn(1, 4, generator=g))).all()  # a constant image


def test_comparison_recovers_a_known_scale_and_counts_undefined_samples():
    g = torch.Generator().manual_seed(1)
    psi = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    change = 0.3 * psi
    corr = correlation(psi, change).numpy()
    corr_ot = corr - 0.5
    corr_ot[0] = np.nan
    m = _comparison(corr, corr_ot, psi, change)
    assert abs(m["median_fitted_eta"] - 0.3) < 1e-12
    assert abs(m["median_corr"] - 1) < 1e-12 and abs(m["median_corr_ot"] - 0.5) < 1e-12
    assert m["num_samples"] == 6 and m["num_samples_ot"] == 5 and m["fraction_ours_better"] == 1.0
    assert abs(m["p_value_ours_vs_ot"] - 2 / 2**5) < 1e-15  # 5 wins of 5, the NaN dropped
    np.testing.assert_allclose(m["median_corr_ci"], [1, 1], atol=1e-12)  # every correlation is 1


def test_a_shift_shared_by_all_samples_is_told_apart_from_per_sample_skill():
    """change_i = a + b_i with sum_i b_i = 0: a prediction b_i has centred correlation 1,
    one of a alone has none left after centring, the mean shift of the others predicts a
    pure common shift perfectly, and the shift's share of the energy is |a|^2 / (|a|^2 +
    mean |b_i|^2) (the cross terms sum to zero)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64)
    b -= b.mean(0, keepdim=True)
    rays = a.expand(20, -1, -1, -1) + 1e-3 * torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64)
    m = _beyond_common_shift(b, rays, a + b)
    assert abs(m["median_corr_centered"] - 1) < 1e-12
    assert abs(m["median_corr_centered_ot"]) < 0.5 and m["fraction_ours_better_centered"] == 1.0
    assert abs(m["p_value_ours_vs_ot_centered"] - 2 / 2**20) < 1e-15
    expected = float(a.square().sum() / (a.square().sum() + b.flatten(1).square().sum(1).mean()))
    assert abs(m["mean_shift_energy"] - expected) < 1e-12
    pure = _beyond_common_shift(b, rays, a.expand(20, -1, -1, -1).clone())
    assert abs(pure["median_corr_mean_shift"] - 1) < 1e-12 and abs(pure["mean_shift_energy"] - 1) < 1e-12


def test_the_sensitivity_run_draws_the_same_samples_as_plain_sampling():
    """The actual change is Phi^perturbed(z0) - Phi^base(z0) with the base samples taken from
    the sensitivity run: its path must be the plain PF-ODE path (same model call, with the
    JVPs riding along), bit for bit."""
    model = build_network_model(TINY_UNET, (1, 8, 8), VPDiscrete())
    z0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    nu = Perturbation([GaussianMixture.empirical(torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)))])
    settings = solver_settings_with(num_steps=6, progress=False, weight_clamp=(0.1, 10), batch_size=3)
    fused = Integrator(model, settings, nu).run(z0)
    plain = Integrator(model, settings).run(z0)
    assert torch.equal(fused.samples, plain.samples)
    assert fused.psi[0].abs().sum() > 0
