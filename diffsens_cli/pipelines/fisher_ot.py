"""Related paper (diffusion Fisher, Sec. 6, Algorithm 2, Table 3): is the PF-ODE map optimal transport?

A smooth map is a Monge optimal transport map for the quadratic cost iff it is the gradient
of a convex potential (Brenier), i.e. iff its Jacobian (the paper's "normalised fundamental
matrix") is symmetric positive semi-definite along every path.  Here the Jacobian
``A = d z1 / d z0`` of the flow map from noise (``t = 0``) to data (``t = 1 - t_min``) is
integrated as ``d`` tangents started at the identity (the variational equation
``d psi/dt = J_z v psi``), for every schedule x data set cell, with exact closed-form scores,
over many paths in one integration per cell.

Per path: the asymmetry rate ``||A - A^T||_F / (sqrt 2 ||A||_F)`` (App. B.3's definition;
Sec. 6's text omits the sqrt 2), the eigenvalues of the symmetric part ``(A + A^T) / 2``,
and the index of the paper's released code (the same rate with the diagonal of A zeroed
first).  The paper's A is the Jacobian of the inverse map (data to noise); in 2-D,
``A^-1 = adj(A) / det A`` has the same asymmetry rates, and the eigenvalues of its symmetric
part are those of A's divided by ``det A > 0``, so both directions give the same verdict.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli import progress
from diffsens_cli.builders import build_schedule, device_and_dtype, solver_settings
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import Schedule
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.errors import ConfigError, listed, number, require, whole
from diffsens_cli.plots import synthetic as plots
from diffsens_cli.rundir import RunDir

# Table 3 of the related paper: asymmetry of the fundamental matrix per data set and schedule.
PAPER_TABLE3 = {
    "gaussian": {"ve": 0.0, "vp": 0.0, "subvp": 0.0, "edm": 0.0},
    "affine": {"ve": 0.0, "vp": 0.0, "subvp": 0.0, "edm": 0.0},
    "non_affine": {"ve": 0.2528, "vp": 0.2336, "subvp": 0.1384, "edm": 0.2709},
}

STEP_WARN = 0.01  # a cell whose normalised Jacobians move more than this at half the steps is not converged

DEFINITIONS = {
    "asymmetry": "||A - A^T||_F / (sqrt 2 ||A||_F) of the flow-map Jacobian A (App. B.3's asymmetry rate)",
    "offdiag_index": "the same rate with A's diagonal zeroed first, as the paper's released code computes it "
                     "(0 where the off-diagonal part is below fisher_ot.tol ||A||_F: round-off)",
    "min_eig_sym": "smallest eigenvalue of (A + A^T) / 2; eig_ratio: smallest over largest",
    "step_error": "largest change of a path's asymmetry (offdiag_index_mean: of the mean; jacobian: of A / ||A||_F "
                  "in Frobenius norm) when the step count is halved: an estimate of the integration error",
    "ot": "every path symmetric (asymmetry <= fisher_ot.tol) with a positive definite symmetric part",
    "paper_asymmetry": "the related paper's Table 3 number for the cell (null where it has none)",
}


@dataclass
class Setup:
    """The checked settings of a run: solver, device, the data sets and schedules of the table, paths, tolerance."""

    settings: SolverSettings
    device: torch.device
    dtype: torch.dtype
    datasets: dict[str, GaussianMixture]
    schedules: dict[str, tuple[Schedule, int]]  # name -> (schedule, number of steps)
    num_paths: int
    tol: float


def _mapping(node: object, key: str) -> DictConfig:
    require(isinstance(node, DictConfig) and len(node) >= 1, key, f"must be a non-empty mapping of name: settings, "
            f"got {node!r}")
    return node


def _schedule(node: object, key: str) -> Schedule:
    """``build_schedule`` with its error messages naming ``key`` rather than ``schedule``."""
    require(isinstance(node, DictConfig), key, f"must be a schedule config (kind and its parameters), got {node!r}")
    try:
        return build_schedule(node)
    except ConfigError as e:
        message = str(e).removeprefix(f"{e.key}: ")
        raise ConfigError(key + e.key.removeprefix("schedule"), message) from None


def _dataset(node: object, key: str) -> GaussianMixture:
    """An isotropic Gaussian mixture on R^2: equal-weight components at ``points`` with ``std`` (0: points)."""
    require(isinstance(node, DictConfig), key, f"must be a mapping with points and std, got {node!r}")

    def point(value: object, k: str) -> list[float]:
        xy = listed(value, k, number)
        require(len(xy) == 2, k, f"needs 2 coordinates (Table 3 is in 2-D), got {xy}")
        return xy

    points = listed(node.get("points"), f"{key}.points", point)
    std = number(node.get("std"), f"{key}.std")
    require(std >= 0, f"{key}.std", f"must be >= 0, got {std}")
    k = len(points)
    return GaussianMixture(torch.tensor(points, dtype=torch.float64), torch.full((k,), std, dtype=torch.float64),
                           torch.ones(k, dtype=torch.float64))


def checked(cfg: DictConfig) -> Setup:
    """Every value the task reads, checked: ``solver`` (an ODE) and ``fisher_ot``."""
    require(cfg.solver.method == "ode", "solver.method",
            f"the transport map is the PF-ODE's flow map: use method=ode, got {cfg.solver.method!r}")
    settings = solver_settings(cfg.solver)
    device, dtype = device_and_dtype(cfg.solver)
    fc = cfg.fisher_ot
    num_paths = whole(fc.num_paths, "fisher_ot.num_paths", at_least=1)
    tol = number(fc.tol, "fisher_ot.tol")
    require(0 < tol < 1, "fisher_ot.tol", f"must be in (0, 1), got {tol}")
    datasets = {str(name): _dataset(node, f"fisher_ot.datasets.{name}")
                for name, node in _mapping(fc.datasets, "fisher_ot.datasets").items()}
    schedules = {}
    for name, node in _mapping(fc.schedules, "fisher_ot.schedules").items():
        key = f"fisher_ot.schedules.{name}"
        require(isinstance(node, DictConfig), key, f"must be a mapping with schedule and num_steps, got {node!r}")
        steps = whole(node.get("num_steps"), f"{key}.num_steps")
        require(steps >= 2, f"{key}.num_steps", f"must be >= 2 (the error estimate halves it), got {steps}")
        schedules[str(name)] = (_schedule(node.get("schedule"), f"{key}.schedule"), steps)
    return Setup(settings, device, dtype, datasets, schedules, num_paths, tol)


def check(cfg: DictConfig) -> None:
    checked(cfg)


def flow_jacobians(model: ScoreModel, settings: SolverSettings, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [B, d] and flow-map Jacobians ``A[b, i, j] = d z1_i / d z0_j`` [B, d, d] of the
    PF-ODE from ``z0`` [B, d]: ``d`` tangents started at the identity, no forcing."""
    b, d = z0.shape
    psi0 = torch.eye(d, dtype=z0.dtype, device=z0.device)[:, None, :].expand(d, b, d).contiguous()
    res = Integrator(model, settings).run(z0, psi0=psi0)
    return res.samples, res.psi.permute(1, 2, 0)  # psi[j, b] is column j of A_b


def path_metrics(jac: torch.Tensor, tol: float) -> dict[str, torch.Tensor]:
    """Per-path diagnostics of Jacobians ``jac`` [B, d, d]: ``asymmetry`` and ``offdiag_index``
    [B] (see ``DEFINITIONS``) and the ascending eigenvalues ``eig_sym`` [B, d] of the symmetric part."""
    norm = torch.linalg.matrix_norm(jac)
    asymmetry = torch.linalg.matrix_norm(jac - jac.mT) / (math.sqrt(2) * norm)
    off = jac - torch.diag_embed(jac.diagonal(dim1=-2, dim2=-1))
    off_norm = torch.linalg.matrix_norm(off)
    ratio = torch.linalg.matrix_norm(off - off.mT) / (math.sqrt(2) * off_norm.clamp_min(torch.finfo(jac.dtype).tiny))
    offdiag = torch.where(off_norm > tol * norm, ratio, torch.zeros_like(ratio))
    return {"asymmetry": asymmetry, "offdiag_index": offdiag, "eig_sym": torch.linalg.eigvalsh((jac + jac.mT) / 2)}


def cell_metrics(jac: torch.Tensor, jac_half: torch.Tensor, tol: float,
                 paper: float | None) -> tuple[dict[str, float | int | bool | None], dict[str, torch.Tensor]]:
    """A cell's summary, and its per-path metrics, from its Jacobians [B, d, d] and those at half the steps."""
    m, half = path_metrics(jac, tol), path_metrics(jac_half, tol)
    asym, off, eig = m["asymmetry"], m["offdiag_index"], m["eig_sym"]
    lmin = eig[:, 0]
    unit = [a / torch.linalg.matrix_norm(a)[:, None, None] for a in (jac, jac_half)]
    return {
        "asymmetry_median": float(asym.median()),
        "asymmetry_max": float(asym.max()),
        "asymmetry_mean": float(asym.mean()),
        "offdiag_index_mean": float(off.mean()),
        "offdiag_index_median": float(off.median()),
        "min_eig_sym_min": float(lmin.min()),
        "min_eig_sym_median": float(lmin.median()),
        "eig_ratio_min": float((lmin / eig[:, -1]).min()),
        "num_paths_indefinite": int((lmin <= 0).sum()),
        "step_error_asymmetry": float((asym - half["asymmetry"]).abs().max()),
        "step_error_offdiag_index_mean": abs(float(off.mean()) - float(half["offdiag_index"].mean())),
        "step_error_jacobian": float(torch.linalg.matrix_norm(unit[0] - unit[1]).max()),
        "ot": bool(asym.max() <= tol and lmin.min() > 0),
        "paper_asymmetry": paper,
    }, {**m, "asymmetry_half_steps": half["asymmetry"]}


def _table_rows(metrics: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """Row labels and formatted cells of the figure's table, one row per (schedule, data set)."""
    labels, cells = [], []
    for sname, row in metrics.items():
        for dname, c in row.items():
            paper = c["paper_asymmetry"]
            labels.append(f"{sname} / {dname}")
            cells.append([f"{100 * c['asymmetry_median']:.2f}%", f"{100 * c['asymmetry_max']:.2f}%",
                          f"{100 * c['offdiag_index_mean']:.2f}%", "-" if paper is None else f"{100 * paper:.2f}%",
                          f"{c['min_eig_sym_min']:.2e}", "yes" if c["ot"] else "no"])
    return labels, cells


def run(cfg: DictConfig, run: RunDir) -> None:
    setup = checked(cfg)
    dev, dt = setup.device, setup.dtype
    t0 = torch.tensor(0.0, dtype=dt, device=dev)
    cells = [(s, d) for s in setup.schedules for d in setup.datasets]
    arrays: dict[str, list[np.ndarray]] = {}  # name -> one array per cell
    metrics: dict[str, dict[str, dict]] = {s: {} for s in setup.schedules}
    wall = 0.0
    for sname, dname in progress.bar(cells, desc="fisher_ot", enabled=setup.settings.progress):
        schedule, steps = setup.schedules[sname]
        model = MixtureScore(setup.datasets[dname].to(dev, dt), schedule)
        # The same seed in every cell: common random numbers for the comparison across cells.
        z0 = model.sample_base(setup.num_paths, (2,), t0, torch.Generator(dev).manual_seed(int(cfg.seed)))
        settings = replace(setup.settings, num_steps=steps, step_size=None, progress=False)
        start = time.perf_counter()
        samples, jac = flow_jacobians(model, settings, z0)
        _, jac_half = flow_jacobians(model, replace(settings, num_steps=steps // 2), z0)
        wall += time.perf_counter() - start
        metrics[sname][dname], per_path = cell_metrics(jac, jac_half, setup.tol,
                                                       PAPER_TABLE3.get(dname, {}).get(sname))
        for key, value in {"z0": z0, "samples": samples, "jacobian": jac, **per_path}.items():
            arrays.setdefault(key, []).append(value.cpu().numpy())

    rough = [f"{s}/{d} ({c['step_error_jacobian']:.2g})" for s, row in metrics.items() for d, c in row.items()
             if c["step_error_jacobian"] > STEP_WARN]
    if rough:
        run.warn(f"the normalised Jacobians of {len(rough)} of {len(cells)} cells change by more than {STEP_WARN:g} "
                 f"when their steps are halved: {', '.join(rough)}; raise fisher_ot.schedules.<name>.num_steps")
    shape = (len(setup.schedules), len(setup.datasets))
    out = {k: np.stack(v).reshape(*shape, *v[0].shape) for k, v in arrays.items()}
    out["schedules"], out["datasets"] = np.array(list(setup.schedules)), np.array(list(setup.datasets))
    run.save_arrays("arrays", out)
    labels, table = _table_rows(metrics)
    columns = ["asym. median", "asym. max", "off-diag. index mean", "paper (Table 3)", "min eig sym(A)", "OT"]
    note = (f"Per path, A = dz1/dz0 of the PF-ODE map; asym. = ||A - A^T||_F / (sqrt 2 ||A||_F) (App. B.3), median and "
            f"max over {setup.num_paths} paths; off-diag. index: the same with A's diagonal zeroed, as the paper's "
            "released code computes it,\nmean over paths; min eig sym(A): smallest eigenvalue of (A + A^T)/2 over the "
            "paths; OT: every path symmetric with a positive definite symmetric part.")
    figures = run.save_figure(plots.text_table(labels, columns, table, "Is the PF-ODE map optimal transport? "
                                               "Asymmetry of its Jacobian (related paper, Table 3)", note),
                              "table3_fisher_ot")
    run.write_summary(metrics, definitions=DEFINITIONS, device=str(dev), dtype=str(dt),
                      num_paths=setup.num_paths, num_steps={s: n for s, (_, n) in setup.schedules.items()},
                      t_min=setup.settings.t_min, integrator=setup.settings.integrator, figures=figures,
                      integration_wall_time_s=round(wall, 3))
