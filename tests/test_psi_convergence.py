"""The psi-accuracy study (experiment=digits_psi_convergence): its cost accounting, its
relative differences, and what a tiny run reports."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffsens_cli.builders import solver_settings
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.pipelines.psi_convergence import cost, relative_difference
from diffsens_cli.pipelines.shared.image_stages import ImageStages
from diffsens_cli.stages import StageCache


def test_cost_counts_evaluations_and_tangents():
    """Heun evaluates twice per step; the exact trace carries one tangent per coordinate."""
    solver = OmegaConf.create({
        "method": "ode", "integrator": "heun", "step_size": None, "num_steps": 50, "spacing": "log_snr",
        "t_min": 1e-3, "density": "ccov", "divergence": "hutchinson", "hutchinson_samples": 4, "probe": "rademacher",
        "weight_clamp": None, "batch_size": None, "tangent_batch_size": None, "seed": 0, "progress": False,
        "sde_sensitivity": "drift"})
    assert cost(solver, num_tangents=1, dim=64) == {"score_evaluations": 100, "tangent_evaluations": 500}
    solver.integrator, solver.divergence = "euler", "exact"
    assert cost(solver, num_tangents=3, dim=64) == {"score_evaluations": 50, "tangent_evaluations": 50 * 67}


def test_relative_difference_is_per_sample_and_per_measure():
    b = np.arange(1, 13, dtype=float).reshape(1, 3, 2, 2)  # [K, B, *event]
    a = b.copy()
    a[0, 1] *= 1.5
    np.testing.assert_allclose(relative_difference(a, b), [0.0, 0.5, 0.0])


def test_a_tiny_study_reports_each_variant_against_the_reference(shared_run):
    """The study's numbers against psi computed here with the engine alone, from the same
    base model, S and starting points: each variant (its overrides merged on the
    experiment's solver, probes of seeds 0 and 1) against the reference, and the cost
    columns by hand."""
    out, summary = shared_run("digits_psi_convergence")
    rows = summary["metrics"]["variants"]
    assert set(rows) == {"reference", "paper", "heun_rademacher", "heun_exact"}
    assert "median_rel_diff_psi_between_seeds" not in rows["heun_exact"]  # the exact trace draws no probes
    assert rows["heun_exact"]["tangent_evaluations"] == 2 * 3 * (1 + 64)

    with initialize_config_module("diffsens_cli.configs", version_base=None):
        cfg = compose("config", overrides=["experiment=digits_psi_convergence", "size=tiny"])
    cache = StageCache(out.parent / "outputs" / "stages")  # the shared run's: read only, every stage is there
    stages = ImageStages(cfg, cache)
    model = stages.score_model(stages.base()[1])
    z0, nu = stages.z0(model, 3), Perturbation([GaussianMixture.empirical(stages.S.images)])
    base = OmegaConf.merge(cfg.solver, {"progress": False})  # solver=paper_images: Euler, 1 Gaussian probe, clamp

    def psi(seed: int = 0, **overrides) -> np.ndarray:
        settings = solver_settings(OmegaConf.merge(base, overrides, {"seed": seed}))
        return Integrator(model, settings, nu).run(z0).psi.numpy()

    reference = psi(integrator="heun", num_steps=6, spacing="log_snr", divergence="exact")
    variants = {"paper": {"num_steps": 3},
                "heun_rademacher": {"integrator": "heun", "num_steps": 3, "probe": "rademacher"},
                "heun_exact": {"integrator": "heun", "num_steps": 3, "spacing": "log_snr", "divergence": "exact"}}
    for label, overrides in variants.items():
        ours = psi(**overrides)
        assert rows[label]["median_rel_diff_psi_to_reference"] == pytest.approx(
            float(np.median(relative_difference(ours, reference))), rel=1e-5), label
        if label != "heun_exact":
            assert rows[label]["median_rel_diff_psi_between_seeds"] == pytest.approx(
                float(np.median(relative_difference(psi(1, **overrides), ours))), rel=1e-5, abs=1e-12), label
    assert rows["paper"]["median_rel_diff_psi_to_reference"] > 0.01  # a number that tells the variants apart
    assert cache.log and all(entry["reused"] for entry in cache.log)  # the run's base model, not a new one
