"""How accurate is psi?  The same base samples' sensitivities under a list of solver
settings, each against a converged reference and against itself with other probes.

psi depends on the log-density log rho_t(z_t) through the weights nu_t/rho_t =
exp(log nu_t - log rho_t), and CCoV estimates that log-density with Hutchinson probes
along the path; so probe noise, the time grid and the integrator all move psi.  Each
variant (``convergence.variants``: solver overrides with a label, on top of the experiment's
solver) is integrated once per probe seed (``convergence.seeds``; once if it draws no
probes) as a cached ``sensitivity`` stage of the experiment's base model, and reported
by its cost (score evaluations, and those times the tangents each carries) and the
median over samples of the relative difference of psi to the reference
(``convergence.reference``) and between its own seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import network_precision, solver_settings
from diffsens_cli.core import compare
from diffsens_cli.errors import ConfigError, listed, require, whole
from diffsens_cli.pipelines.shared.image_stages import ImageStages, check_training
from diffsens_cli.plots import images as plots
from diffsens_cli.rundir import RunDir

STAGES = ("train_base", "sensitivity", "network_dtype_check")


def _solvers(cfg: DictConfig) -> dict[str, DictConfig]:
    """The reference and every variant as full ``solver`` nodes, by label."""
    cc = cfg.convergence
    variants = OmegaConf.to_container(cc.variants) if cc.variants is not None else None
    require(isinstance(variants, list) and variants, "convergence.variants",
            f"must list solver overrides, each with a label, got {variants!r}")
    out = {"reference": OmegaConf.merge(cfg.solver, cc.reference)}
    for i, overrides in enumerate(variants):
        require(isinstance(overrides, dict) and isinstance(overrides.get("label"), str), f"convergence.variants[{i}]",
                f"must be solver overrides with a label, got {overrides!r}")
        label = overrides.pop("label")
        require(label not in out, f"convergence.variants[{i}]", f"label {label!r} is used twice")
        out[label] = OmegaConf.merge(cfg.solver, overrides)
    return out


def _seeds(cfg: DictConfig) -> list[int]:
    seeds = listed(cfg.convergence.seeds, "convergence.seeds", whole)
    require(len(seeds) >= 1 and len(set(seeds)) == len(seeds), "convergence.seeds",
            f"must list distinct probe seeds, got {seeds}")
    return seeds


def check(cfg: DictConfig) -> None:
    check_training(cfg)
    solvers = _solvers(cfg)
    for label, solver in solvers.items():
        try:
            solver_settings(solver)
            network_precision(solver)
        except ConfigError as e:  # which variant, as well as which key
            raise ConfigError(f"convergence.{'reference' if label == 'reference' else 'variants: ' + label}",
                              str(e)) from None
    require(cfg.convergence.paper_variant in solvers, "convergence.paper_variant",
            f"must name one of the variants, got {cfg.convergence.paper_variant!r}")
    _seeds(cfg)
    whole(cfg.convergence.num_samples, "convergence.num_samples", at_least=1)


def cost(solver: DictConfig, num_tangents: int, dim: int) -> dict[str, int]:
    """Per sample: score evaluations, and evaluations x tangents (psi's plus the probes,
    or ``dim`` basis vectors for the exact trace)."""
    s = solver_settings(solver)
    evaluations = s.evaluations()
    extra = s.hutchinson_samples if s.divergence == "hutchinson" else dim
    return {"score_evaluations": evaluations, "tangent_evaluations": evaluations * (num_tangents + extra)}


def relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a - b| / |b|`` per sample of [K, B, *event] arrays (K and B flattened together)."""
    return compare.relative_difference(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]))


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    stages = ImageStages(cfg, run.cache)
    n = int(cfg.convergence.num_samples)
    base = stages.base()
    solvers, seeds = _solvers(cfg), _seeds(cfg)
    dim = int(np.prod(stages.event_shape))

    def integrate(solver: DictConfig, seed: int) -> dict[str, np.ndarray]:
        return stages.sensitivity(base, n, solver=OmegaConf.merge(solver, {"seed": seed}))[1]

    ref = integrate(solvers["reference"], seeds[0])
    rows: dict[str, dict[str, Any]] = {}
    arrays = {"z0": ref["z0"], "reference/psi": ref["psi"], "reference/logp": ref["logp"]}
    for label, solver in solvers.items():
        stochastic = solver_settings(solver).divergence == "hutchinson"
        outs = [integrate(solver, s) for s in (seeds if stochastic else seeds[:1])]
        psi_diff = relative_difference(outs[0]["psi"], ref["psi"])
        row = cost(solver, outs[0]["psi"].shape[0], dim) | {
            "median_rel_diff_psi_to_reference": float(np.median(psi_diff)),
            "median_abs_diff_logp_to_reference": float(np.median(np.abs(outs[0]["logp"] - ref["logp"]))),
            "median_rel_diff_samples_to_reference": float(np.median(relative_difference(
                outs[0]["samples"][None], ref["samples"][None]))),
            "wall_time_s": float(outs[0]["wall_time_s"]),
            "settings": {k: v for k, v in OmegaConf.to_container(solver, resolve=True).items()
                         if k in ("integrator", "num_steps", "step_size", "spacing", "divergence",
                                  "hutchinson_samples", "probe", "network_dtype")},
        }
        if len(outs) > 1:
            row["median_rel_diff_psi_between_seeds"] = float(np.median(relative_difference(outs[1]["psi"],
                                                                                          outs[0]["psi"])))
            row["median_abs_diff_logp_between_seeds"] = float(np.median(np.abs(outs[1]["logp"] - outs[0]["logp"])))
        rows[label] = row
        arrays[f"{label}/psi_rel_diff"] = psi_diff
    run.save_arrays("arrays", arrays)
    paper = str(cfg.convergence.paper_variant)  # check() made sure it is a variant
    figures = run.save_figure(plots.cost_accuracy(rows, paper_label=paper), "psi_convergence")
    run.write_summary({"variants": rows}, num_samples=n, reference=OmegaConf.to_container(cfg.convergence.reference),
                      paper_cost=rows[paper]["tangent_evaluations"], figures=figures,
                      device=str(stages.device), dtype=str(stages.dtype))
    for label, row in sorted(rows.items(), key=lambda kv: kv[1]["tangent_evaluations"]):
        seeds_diff = row.get("median_rel_diff_psi_between_seeds")
        print(f"{label:>28}: {row['tangent_evaluations']:>8} tangent evals, "
              f"psi {row['median_rel_diff_psi_to_reference']:.3f} from reference"
              + (f", {seeds_diff:.3f} between seeds" if seeds_diff is not None else ""))
