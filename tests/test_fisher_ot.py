"""Related paper's Table 3 (diffusion Fisher, Sec. 6): the flow-map Jacobian from psi0 = I, its
asymmetry on the paper's data, and the experiment end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import diffsens, solver_settings_with
from hydra import compose, initialize_config_module

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VE, VPLinear
from diffsens_cli.errors import ConfigError
from diffsens_cli.pipelines import check_task
from diffsens_cli.pipelines.fisher_ot import PAPER_TABLE3, flow_jacobians, path_metrics

F64 = torch.float64
NON_AFFINE = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.5, 0.0]], dtype=F64)  # Table 3's non-affine points
AFFINE = torch.tensor([[0.2, -0.4], [0.2, 0.0], [0.2, 0.9]], dtype=F64)  # App. B.3's affine (collinear) points


def points(pts: torch.Tensor, std: float = 0.0) -> GaussianMixture:
    return GaussianMixture(pts, torch.full((len(pts),), std, dtype=F64), torch.ones(len(pts), dtype=F64))


def settings(num_steps: int) -> SolverSettings:
    return solver_settings_with(method="ode", integrator="heun", num_steps=num_steps, step_size=None, t_min=1e-3,
                          density="closed_form", progress=False)


def start(model: MixtureScore, n: int, seed: int = 0) -> torch.Tensor:
    return model.sample_base(n, (2,), torch.tensor(0.0, dtype=F64), torch.Generator().manual_seed(seed))


def test_jacobian_matches_a_central_difference_of_the_flow_map():
    """psi0 = I gives d z1 / d z0 of the discrete flow map: against (Phi(z0 + h e_j) - Phi(z0 - h e_j)) / 2h
    on the non-affine points, where the Jacobian is far from a multiple of I."""
    model = MixtureScore(points(NON_AFFINE), VPLinear())
    solver = settings(200)
    z0 = start(model, 8)
    _, jac = flow_jacobians(model, solver, z0)
    h = 1e-5
    shifts = h * torch.eye(2, dtype=F64)[:, None, :]  # [j, 1, d]
    moved = Integrator(model, solver).run(torch.cat([(z0 + shifts).flatten(0, 1), (z0 - shifts).flatten(0, 1)]))
    plus, minus = moved.samples.view(2, 2, 8, 2)
    fd = ((plus - minus) / (2 * h)).permute(1, 2, 0)  # [b, i, j]
    err = torch.linalg.matrix_norm(jac - fd) / torch.linalg.matrix_norm(jac)
    assert err.max() < 1e-7, err  # about 1e-8 at h = 1e-5; A^T instead of A misses by 0.28
    assert path_metrics(jac, 1e-9)["asymmetry"].max() > 1e-2  # a case that can tell A from A^T


def test_gaussian_and_affine_maps_are_symmetric_and_three_points_are_not():
    """A single isotropic Gaussian N(m, s^2 I): the flow map is affine, A = sqrt(V_1 / V_0) I with
    V_t = alpha_t^2 s^2 + sigma_t^2, for every start, so A is symmetric to round-off and its
    eigenvalues are that value (to Heun's error at 400 steps).  Collinear points: A is far from
    a multiple of I (eigenvalue ratio < 0.1) yet symmetric, as every J_z v along the path is
    diagonal in the same basis.  The three non-affine points: clearly asymmetric."""
    solver, n = settings(400), 64
    out = {}
    for name, measure in (("gaussian", points(torch.tensor([[0.5, 0.5]], dtype=F64), 0.3)),
                          ("affine", points(AFFINE)), ("non_affine", points(NON_AFFINE))):
        model = MixtureScore(measure, VPLinear())
        out[name] = path_metrics(flow_jacobians(model, solver, start(model, n))[1], 1e-9)
    sched, (t0, t1, _) = VPLinear(), solver.grid()
    var = lambda t: sched.alpha(torch.tensor(t, dtype=F64)) ** 2 * 0.3**2 + sched.sigma(torch.tensor(t, dtype=F64)) ** 2
    factor = (var(t1) / var(t0)).sqrt()
    # Heun at 400 steps is 7e-5 off (it falls as h^2: test_closed_form_paths)
    torch.testing.assert_close(out["gaussian"]["eig_sym"], factor.expand(n, 2), rtol=1e-4, atol=0)
    assert out["gaussian"]["asymmetry"].max() < 1e-12
    assert out["affine"]["asymmetry"].max() < 1e-12
    eig = out["affine"]["eig_sym"]
    assert (eig[:, 0] > 0).all() and (eig[:, 0] / eig[:, 1]).min() < 0.1
    asym = out["non_affine"]["asymmetry"]
    assert asym.median() > 5e-3 and asym.max() > 0.1
    assert out["non_affine"]["offdiag_index"].mean() > 0.1


def test_map_depends_on_the_schedule_only_through_its_ends():
    """With y = z / alpha and lambda = sigma / alpha every PF-ODE is the VE one in lambda, so VP's
    Jacobian at z0 is alpha_1 / alpha_0 times VE's at z0 / alpha_0 when VE spans VP's lambda range:
    why the four schedules' rows of Table 3 agree."""
    vp, t_min = VPLinear(), 1e-3
    ends = torch.tensor([0.0, 1.0 - t_min], dtype=F64)
    alpha, lam = vp.alpha(ends), vp.sigma(ends) / vp.alpha(ends)
    log0, log1 = math.log(lam[0]), math.log(lam[1])  # VE: log sigma = log s_min + tau log(s_max / s_min)
    ve = VE(sigma_min=math.exp((log1 - t_min * log0) / (1 - t_min)), sigma_max=float(lam[0]))
    vp_model, ve_model = MixtureScore(points(NON_AFFINE), vp), MixtureScore(points(NON_AFFINE), ve)
    z0 = start(vp_model, 32)
    _, jac_vp = flow_jacobians(vp_model, settings(2000), z0)
    _, jac_ve = flow_jacobians(ve_model, settings(1000), z0 / alpha[0])
    unit = [a / torch.linalg.matrix_norm(a)[:, None, None] for a in (jac_vp, jac_ve)]
    assert torch.linalg.matrix_norm(unit[0] - unit[1]).max() < 1e-3
    # The scale alpha_1 / alpha_0 too, to the step error of the stiff last steps (J_v ~ 1/sigma^2 there).
    ratio = torch.linalg.matrix_norm(jac_vp) / torch.linalg.matrix_norm(alpha[1] / alpha[0] * jac_ve)
    assert (ratio - 1).abs().max() < 2e-2
    a_vp, a_ve = path_metrics(jac_vp, 1e-9)["asymmetry"], path_metrics(jac_ve, 1e-9)["asymmetry"]
    assert (a_vp - a_ve).abs().max() < 1e-3 and a_vp.max() > 0.05


# Few steps, but enough that the stiff last steps (J_v ~ 1/sigma^2 at the data end) stay stable.
STEPS = {"ve": 100, "vp": 800, "subvp": 800, "edm": 1200}
TINY = [f"fisher_ot.schedules.{s}.num_steps={n}" for s, n in STEPS.items()]


def test_experiment_runs_and_writes_the_table(tmp_path):
    """The CLI run at small settings: the 4 x 3 table in summary.json (symmetric and positive definite
    for the Gaussian and affine data, asymmetric for the three points), arrays and figure."""
    out = tmp_path / "run"
    r = diffsens("run", "experiment=fisher_ot_check", f"hydra.run.dir={out}", "solver.progress=false",
                 "fisher_ot.num_paths=16", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert list(metrics) == ["ve", "vp", "subvp", "edm"]
    for schedule, row in metrics.items():
        assert list(row) == ["gaussian", "affine", "non_affine"]
        for data in ("gaussian", "affine"):
            assert row[data]["asymmetry_max"] < 1e-10 and row[data]["offdiag_index_mean"] == 0
            assert row[data]["min_eig_sym_min"] > 0 and row[data]["ot"] is True
        non_affine = row["non_affine"]
        assert non_affine["asymmetry_max"] > 0.05 and non_affine["offdiag_index_mean"] > 0.05
        assert non_affine["ot"] is False
        for data, cell in row.items():
            assert cell["paper_asymmetry"] == PAPER_TABLE3[data][schedule]
    assert summary["num_steps"] == STEPS
    # EDM's uniform steps in sigma are too coarse at 1200 where VP's 800 are not: said in one warning.
    step_error = {s: metrics[s]["non_affine"]["step_error_jacobian"] for s in ("vp", "edm")}
    assert step_error["edm"] > 0.01 > step_error["vp"]
    assert [w for w in summary["warnings"] if "edm/non_affine" in w and "raise fisher_ot.schedules" in w]
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["jacobian"].shape == (4, 3, 16, 2, 2) and np.isfinite(arrays["jacobian"]).all()
        np.testing.assert_allclose(arrays["asymmetry"][:, 2].max(1),
                                   [metrics[s]["non_affine"]["asymmetry_max"] for s in metrics])
    assert (out / "table3_fisher_ot.png").stat().st_size > 1000


@pytest.mark.parametrize("override,expected", [
    ("fisher_ot.datasets.affine.points=[[0.2,0.1,0.3]]",
     "fisher_ot.datasets.affine.points[0]: needs 2 coordinates (Table 3 is in 2-D), got [0.2, 0.1, 0.3]"),
    ("fisher_ot.schedules.ve.schedule.kind=foo", "fisher_ot.schedules.ve.schedule.kind: 'foo' is not one of"),
    ("fisher_ot.schedules.edm.num_steps=1", "fisher_ot.schedules.edm.num_steps: must be >= 2"),
    ("solver.method=sde", "solver.method: the transport map is the PF-ODE's flow map"),
    ("fisher_ot.tol=0", "fisher_ot.tol: must be in (0, 1), got 0.0"),
])
def test_bad_settings_are_one_line_naming_the_key(override, expected):
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=fisher_ot_check", override])
    with pytest.raises(ConfigError) as e:
        check_task(cfg)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)

