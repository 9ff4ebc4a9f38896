"""Paper Figs. 1-2: rho on a planar curve, nu a Gaussian just off it.

Fig. 1 is the score sensitivity field ``g_t`` over the plane at a few times; Fig. 2 the
PF-ODE sample paths, their sample sensitivities ``psi``, and the perturbed model's
samples from the same noise, which ``Phi^0 + eta psi`` should predict.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.builders import Components
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.score_sensitivity import WeightStats
from diffsens_cli.errors import listed, number, require, whole
from diffsens_cli.plots import synthetic as plots
from diffsens_cli.rundir import RunDir


def sensitivity_field(comp: Components, grid: torch.Tensor, t: float, stats: WeightStats) -> torch.Tensor:
    """``g_t`` (Eq. 1, exact densities) at the points of ``grid``."""
    co = comp.schedule.coefficients(torch.tensor(t, dtype=grid.dtype, device=grid.device))
    rho = comp.target.diffused(grid, co.alpha, co.sigma)
    return comp.perturbation.forcing(grid, co, rho.log_density, rho.score, comp.solver.weight_clamp, [stats])[0]


def checked(cfg: DictConfig, comp: Components) -> list[float]:
    """The field times, after checking every ``toy2d`` value and that ``comp`` suits the figures."""
    require(comp.target.dim == 2, "dataset.dim", "toy2d draws the plane: use a 2-D data set")
    require(comp.model.has_log_density, "model.kind", "toy2d uses exact densities: closed_form")
    tc = cfg.toy2d
    times = listed(tc.field_times, "toy2d.field_times", number)
    require(all(0 <= t < 1 for t in times), "toy2d.field_times", f"must lie in [0, 1), got {times}")
    whole(tc.grid_size, "toy2d.grid_size", at_least=2)
    require(number(tc.extent, "toy2d.extent") > 0, "toy2d.extent", f"must be > 0, got {tc.extent}")
    whole(tc.num_paths, "toy2d.num_paths", at_least=1)
    require(0 < number(tc.eta, "toy2d.eta") <= 1, "toy2d.eta",
            f"must be in (0, 1] (the weight of nu in the mixture), got {tc.eta}")
    return times


def check(cfg: DictConfig) -> None:
    checked(cfg, Components(cfg))


def run(cfg: DictConfig, run: RunDir) -> None:
    comp = Components(cfg).on_device()
    tc = cfg.toy2d
    times = checked(cfg, comp)
    dev, dt = comp.device, comp.dtype

    axis = torch.linspace(-float(tc.extent), float(tc.extent), int(tc.grid_size), dtype=dt, device=dev)
    grid = torch.cartesian_prod(axis, axis)
    stats = WeightStats()
    fields = torch.stack([sensitivity_field(comp, grid, t, stats) for t in times])

    gen = torch.Generator(dev).manual_seed(int(cfg.seed))
    t0 = torch.tensor(0.0, dtype=dt, device=dev)
    n = int(tc.num_paths)
    z0 = comp.model.sample_base(n, (2,), t0, gen)
    res = Integrator(comp.model, comp.solver, comp.perturbation).run(z0)
    psi = res.psi[0]  # the one measure nu
    eta = float(tc.eta)
    nu = comp.perturbation.measures[0]
    mixed = comp.target.mix(nu, eta) if comp.perturbation.signs[0] > 0 else None
    perturbed = Integrator(MixtureScore(mixed, comp.schedule), comp.solver).run(z0).samples if mixed else None
    t1 = torch.tensor(comp.solver.grid()[1], dtype=dt, device=dev)
    logp = comp.model.log_density(res.samples.to(dev), t1).cpu()

    support = comp.target.means.cpu().numpy()
    nu_mean = nu.means.mean(0).cpu().numpy()
    arrays = {
        "z0": z0.cpu().numpy(), "samples": res.samples.numpy(), "psi": psi.numpy(), "logp": logp.numpy(),
        "path": res.path.numpy(), "psi_path": res.psi_path[:, 0].numpy(), "path_times": res.path_times.numpy(),
        "grid": grid.cpu().numpy(), "field_times": np.array(times), "field_g": fields.cpu().numpy(),
        "support": support, "nu_mean": nu_mean, "eta": np.array(eta),
    }
    metrics = {"median_abs_psi": float(psi.norm(dim=1).median())}
    reasons: dict[str, str] = {}  # why a metric may be NaN, for the summary
    figures = run.save_figure(plots.score_sensitivity_field(arrays["grid"], arrays["field_g"], times, support, nu_mean),
                              "fig1_score_sensitivity")
    if perturbed is not None:
        arrays["perturbed"] = perturbed.numpy()
        change = perturbed - res.samples
        cos = torch.nn.functional.cosine_similarity(change, psi, dim=1)
        metrics["median_cosine_psi_vs_change"] = float(cos.median())
        size = change.norm(dim=1)
        moved = torch.isfinite(size) & (size > 0)  # the relative error of a sample that did not move is undefined
        rel = (change - eta * psi).norm(dim=1) / size
        metrics["median_relative_error_first_order"] = float(rel[moved].median()) if moved.any() else float("nan")
        metrics["num_samples_moved"] = int(moved.sum())
        reasons["metrics.median_relative_error_first_order"] = "no sample has a finite, non-zero change"
        figures += run.save_figure(plots.sample_paths(arrays["path"], arrays["psi"], arrays["perturbed"], eta, support,
                                                      nu_mean), "fig2_sample_sensitivity")
    run.save_arrays("arrays", arrays)
    run.warn_if_zero_psi(arrays["psi"], res.weights[0].as_dict())
    stats.merge(res.weights[0])
    run.write_summary(metrics, reasons, weights=stats.as_dict(), device=str(dev), dtype=str(dt), figures=figures,
                      sensitivity_wall_time_s=res.wall_time_s)
