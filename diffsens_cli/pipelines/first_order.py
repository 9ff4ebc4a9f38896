"""Paper Fig. 3 (App. F.1.1): does ``Phi^0 + eta psi`` predict ``Phi^eta`` to ``o(eta)``?

For each solver variant (ODE and SDE step sizes; Hutchinson probe counts against exact
densities), integrate the sensitivity of the base model's samples, then the perturbed
targets ``(1 - eta) rho + eta nu`` from the same ``z0`` (and Wiener increments), and
report the median over samples of ``|R(eta)| / eta``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli import progress
from diffsens_cli.builders import Components
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.errors import listed, number, one_of, require, whole
from diffsens_cli.plots import synthetic as plots
from diffsens_cli.rundir import RunDir, dotted

STAGES = ("curve",)
ROUNDOFF = 10.0  # |R| within this many eps |Phi^0| is round-off (see _roundoff_below)


def variants(fo: DictConfig, solver: SolverSettings) -> list[tuple[str, str, SolverSettings]]:
    """(panel, label, settings) for every curve of the figure; checks every list of ``fo``:
    step sizes in (0, 1 - t_min] (the integration interval), probe counts >= 1, probe names."""
    t1 = 1.0 - solver.t_min

    def step(value: object, key: str) -> float:
        h = number(value, key)
        require(0 < h <= t1, key, f"must be in (0, {t1:g}] (1 - solver.t_min), got {h:g}")
        return h

    def count(value: object, key: str) -> int:
        k = whole(value, key, at_least=1)
        return k

    exact = dict(density="closed_form", num_steps=None)
    out = [("ode", f"step {h:g}", replace(solver, method="ode", step_size=h, **exact))
           for h in listed(fo.ode_step_sizes, "first_order.ode_step_sizes", step)]
    out += [("sde", f"step {h:g}", replace(solver, method="sde", step_size=h, integrator="euler", **exact))
            for h in listed(fo.sde_step_sizes, "first_order.sde_step_sizes", step)]
    hh = step(fo.hutchinson_step_size, "first_order.hutchinson_step_size")
    out.append(("hutchinson", "exact density", replace(solver, method="ode", step_size=hh, **exact)))
    probes = listed(fo.hutchinson_probes, "first_order.hutchinson_probes",
                    lambda v, key: one_of(v, ["gaussian", "rademacher"], key))
    out += [("hutchinson", f"{k} {kind} probe{'s' if k > 1 else ''}",
             replace(solver, method="ode", step_size=hh, num_steps=None, density="ccov", divergence="hutchinson",
                     hutchinson_samples=k, probe=kind))
            for kind in probes for k in listed(fo.hutchinson_samples, "first_order.hutchinson_samples", count)]
    return out


def checked(cfg: DictConfig, comp: Components) -> tuple[list[float], int]:
    """The sorted etas and the number of samples, after checking every ``first_order`` value
    and that ``comp`` suits the experiment."""
    require(comp.perturbation.signs[0] > 0, "perturbation.direction",
            "first_order compares against the mixture (1 - eta) rho + eta nu: use direction=add")
    require(comp.model.has_log_density, "model.kind", "first_order needs closed-form perturbed targets: closed_form")
    fo = cfg.first_order
    etas = sorted(listed(fo.etas, "first_order.etas", number, min_len=2))
    require(etas[0] > 0 and etas[-1] <= 1, "first_order.etas", f"needs >= 2 values in (0, 1], got {etas}")
    n = whole(fo.num_samples, "first_order.num_samples", at_least=1)
    variants(fo, comp.solver)
    return etas, n


def check(cfg: DictConfig) -> None:
    checked(cfg, Components(cfg))


def remainder_curve(comp: Components, settings: SolverSettings, z0: torch.Tensor, etas: list[float]) -> dict:
    """Sensitivities, then median ``|R(eta)|/eta`` over samples for each ``eta``.

    The perturbed targets for all etas are integrated as one batch of replicas of
    ``z0``, sharing its Wiener increments and probes (keyed by row, so the two runs may
    be chunked differently)."""
    n, r = z0.shape[0], len(etas)
    base = Integrator(comp.model, settings, comp.perturbation).run(z0)
    family = MixtureScore(comp.target.mix(comp.perturbation.measures[0], etas), comp.schedule)
    perturbed = Integrator(family, replace(settings, progress=False)).run(z0.repeat(r, 1), replicas=r).samples
    psi = base.psi[0]  # the one measure nu
    eta = torch.tensor(etas, dtype=psi.dtype)[:, None, None]
    rem = perturbed.view(r, n, -1) - base.samples.flatten(1) - eta * psi.flatten(1)
    medians = (rem.norm(dim=-1) / eta[..., 0]).median(dim=1).values.tolist()
    t1 = torch.tensor(settings.grid()[1], dtype=z0.dtype, device=z0.device)
    logp = base.logp if base.logp is not None else comp.model.log_density(base.samples.to(z0.device), t1).cpu()
    weights = {f"weights/{k}": np.array(v) for k, v in base.weights[0].as_dict().items()}
    return {"samples": base.samples.numpy(), "psi": psi.numpy(), "logp": logp.numpy(),
            "remainder_over_eta": np.array(medians), "wall_time_s": np.array(base.wall_time_s), **weights}


def run(cfg: DictConfig, run: RunDir) -> None:
    comp = Components(cfg).on_device()
    fo = cfg.first_order
    etas, n = checked(cfg, comp)

    gen = torch.Generator(comp.device).manual_seed(int(cfg.seed))
    t0 = torch.tensor(0.0, dtype=comp.dtype, device=comp.device)
    z0 = comp.model.sample_base(n, (comp.target.dim,), t0, gen)

    depends = OmegaConf.to_container(cfg, resolve=True)  # what a curve depends on, less display
    del depends["first_order"], depends["stages"], depends["solver"]["progress"]
    depends["etas"], depends["num_samples"] = etas, n
    curves, reference = [], None
    panels = progress.bar(variants(fo, comp.solver), desc="first_order", enabled=comp.solver.progress)
    for panel, label, settings in panels:
        # Keyed by what the curve depends on, so equal settings in two panels run once.
        arrays = run.cache.arrays("curve", {**depends, "settings": repr(replace(settings, progress=True))},
                                  lambda: remainder_curve(comp, settings, z0, etas))
        curves.append((panel, label, arrays))
        if reference is None and panel == "ode" and settings.step_size == float(fo.hutchinson_step_size):
            reference = arrays
    reference = reference or curves[0][2]

    remainders = np.stack([a["remainder_over_eta"] for _, _, a in curves])
    run.save_arrays("arrays", {
        "z0": z0.cpu().numpy(), "samples": reference["samples"], "psi": reference["psi"], "logp": reference["logp"],
        "etas": np.array(etas), "remainder_over_eta": remainders,
        "panel": np.array([p for p, _, _ in curves]), "label": np.array([lab for _, lab, _ in curves]),
        **{f"psi/{p}/{lab}": a["psi"] for p, lab, a in curves},
    })
    figures = run.save_figure(plots.remainder_panels(etas, curves), "fig3_remainders")

    metrics = {
        f"{p}/{lab}": {
            "median_remainder_over_eta": dict(zip(map(str, etas), a["remainder_over_eta"].tolist())),
            "slope_loglog": _slope(etas, a["remainder_over_eta"]),
            "roundoff_below_eta": _roundoff_below(etas, a["remainder_over_eta"], a["samples"]),
            "sensitivity_wall_time_s": float(a["wall_time_s"]),
        }
        for p, lab, a in curves
    }
    reasons = {dotted("metrics", name, "slope_loglog"): "fewer than 2 positive remainders for eta in [1e-3, 0.1]"
               for name in metrics}
    weights = {k.split("/")[1]: int(sum(a[k] for _, _, a in curves)) for k in curves[0][2] if k.startswith("weights/")}
    run.warn_if_zero_psi([a["psi"] for _, _, a in curves], weights)
    stalled = [m["roundoff_below_eta"] for m in metrics.values() if m["roundoff_below_eta"] is not None]
    if stalled:
        run.warn(f"|R(eta)|/eta stalls at {reference['samples'].dtype} round-off (median |R| <= {ROUNDOFF:g} eps "
                 f"median |Phi^0|) for eta <= {max(stalled):g} in {len(stalled)} of {len(curves)} curves, where it "
                 "cannot show o(eta); use " + ("solver.dtype=float64 or " if reference["samples"].dtype != np.float64
                                                else "") + "larger first_order.etas")
    run.write_summary(metrics, reasons, weights=weights, device=str(comp.device), dtype=str(comp.dtype),
                      num_samples=n, figures=figures)


def _roundoff_below(etas: list[float], r: np.ndarray, samples: np.ndarray) -> float | None:
    """The largest eta at and below which every median |R(eta)| (``r`` is median |R|/eta at the
    sorted ``etas``) is at most ``ROUNDOFF * eps * median |Phi^0(z0)|``, about the resolution
    of the samples in their dtype: there |R| is flat round-off (R/eta rises like 1/eta) and
    cannot fall like o(eta).  None unless the two smallest etas are both there: a curve whose
    last point just touches round-off still fell to it."""
    scale = np.median(np.linalg.norm(samples.reshape(len(samples), -1), axis=1))
    at = np.array(etas) * r <= ROUNDOFF * np.finfo(samples.dtype).eps * scale  # NaN: not round-off
    k = len(at) if at.all() else int(np.argmin(at))
    return float(etas[k - 1]) if k >= 2 else None


def _slope(etas: list[float], r: np.ndarray) -> float:
    """Least-squares slope of log(R/eta) against log(eta) over eta in [1e-3, 0.1]: about 1
    where the remainder is O(eta^2), 0 on a noise floor."""
    e = np.array(etas)
    m = (e >= 1e-3) & (e <= 0.1) & (r > 0)
    if m.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log10(e[m]), np.log10(r[m]), 1)[0])
