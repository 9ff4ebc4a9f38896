"""The psi-accuracy study (experiment=digits_psi_convergence): its cost accounting, its
relative differences, and what a tiny run reports."""

from __future__ import annotations

import json

import numpy as np
from helpers import diffsens
from omegaconf import OmegaConf

from diffsens_cli.pipelines.psi_convergence import cost, relative_difference


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


def test_a_tiny_study_reports_each_variant_against_the_reference(tmp_path):
    out = tmp_path / "run"
    r = diffsens("run", "experiment=digits_psi_convergence", "size=tiny", f"hydra.run.dir={out}",
                 "solver.progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "summary.json").read_text())["metrics"]["variants"]
    assert set(rows) == {"reference", "paper", "heun_rademacher", "heun_exact"}
    assert rows["reference"]["median_rel_diff_psi_to_reference"] == 0.0  # the reference against itself
    # probes of two seeds differ: so do the densities (psi may not, where every weight is clamped)
    assert rows["paper"]["median_abs_diff_logp_between_seeds"] > 0
    assert "median_rel_diff_psi_between_seeds" in rows["paper"]
    assert "median_rel_diff_psi_between_seeds" not in rows["heun_exact"]  # the exact trace draws no probes
    assert rows["heun_exact"]["tangent_evaluations"] == 2 * 3 * (1 + 64)
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["paper/psi_rel_diff"].shape == (3,) and np.isfinite(arrays["reference/psi"]).all()
