"""Paper App. E (Figs. 15-16): the sensitivities of a few base samples to several
perturbation sets, one per attribute (CelebA: bald, goatee, smiling, eyeglasses).

Stages (cached, see ``image_stages``): train the base model, then one sensitivity
integration that carries one tangent per set along each sample's path.  Fig. 15 shows the samples above one row
of sensitivities per set; Fig. 16 the line segments ``x + a psi`` for each set.
"""

from __future__ import annotations

import re

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import solver_settings
from diffsens_cli.errors import listed, number, require, whole
from diffsens_cli.pipelines.shared.image_stages import ImageStages, check_training
from diffsens_cli.plots import images as plots
from diffsens_cli.rundir import RunDir
from diffsens_cli.sharding import finish_partial

STAGES = ("train_base", "sensitivity", "network_dtype_check")


def _sets(cfg: DictConfig) -> list[str]:
    sets = OmegaConf.to_container(cfg.attributes.sets)
    require(isinstance(sets, list) and len(sets) >= 1 and all(isinstance(v, str) for v in sets), "attributes.sets",
            f"must list attribute expressions, one a perturbation set, got {sets!r}")
    return sets


def check(cfg: DictConfig) -> None:
    check_training(cfg)
    solver_settings(cfg.solver)
    _sets(cfg)
    whole(cfg.attributes.num_samples, "attributes.num_samples", at_least=1)
    listed(cfg.attributes.coefficients, "attributes.coefficients", number)


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    stages = ImageStages(cfg, run.cache)
    n = int(cfg.attributes.num_samples)
    base_model = stages.base()
    labels = _sets(cfg)
    # Every set's sensitivities along one path per sample: one stage, K = len(labels) tangents.
    _, out = stages.sensitivity(base_model, n, [OmegaConf.merge(cfg.perturbation, {"attributes": v}) for v in labels])
    if out is None:  # one job of a sharded run: its share is cached, the unsharded run assembles
        return finish_partial(run, stages.shard, stages.blocks_mine, stages.blocks_all)
    rows = list(zip(labels, out["psi"], strict=True))
    arrays = {k: out[k] for k in ("z0", "samples", "logp")} | {f"psi/{label}": psi for label, psi in rows}
    sizes = {label: int(size) for label, size in zip(labels, out["size_S"], strict=True)}
    weights = {label: {k.split("/")[1]: int(v[i]) for k, v in out.items() if k.startswith("weights/")}
               for i, label in enumerate(labels)}

    samples = out["samples"]
    coefficients = np.asarray(OmegaConf.to_container(cfg.attributes.coefficients), dtype=float)
    figures = run.save_figure(plots.sensitivity_rows(samples, rows, ncol=n), "fig15_attribute_sensitivities")
    for label, psi in rows:  # x + a psi: the first-order prediction of the samples at eta = a
        name = "fig16_line_segments_" + re.sub(r"\W+", "_", label)
        figures += run.save_figure(plots.line_segments(samples, psi, coefficients, title=f"x + a psi: {label}"), name)
    run.save_arrays("arrays", arrays)
    norms = {label: float(np.median(np.linalg.norm(psi.reshape(len(psi), -1), axis=1))) for label, psi in rows}
    totals = {k: sum(w[k] for w in weights.values()) for k in next(iter(weights.values()))}
    run.warn_if_zero_psi([psi for _, psi in rows], totals)
    run.write_summary({"median_psi_norm": norms}, sizes=sizes, weights=totals, weights_by_set=weights, num_samples=n,
                      device=str(stages.device), dtype=str(stages.dtype), network_dtype=cfg.solver.network_dtype,
                      figures=figures)
