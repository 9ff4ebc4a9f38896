"""Paper Sec. 4.3 (Figs. 5-7): do sample sensitivities predict how a model's samples
change after retraining or fine-tuning on a perturbation set S?

Stages (each cached, see ``image_stages``): train the base model on rho; retrain on
``(1 - eta_bar) rho + eta_bar S`` and fine-tune the base model on S; integrate the base
model's samples with their sensitivities ``psi`` to S; sample the retrained and the
fine-tuned model from the same ``z0``; solve the entropic-OT baseline.  Then, per base
sample, the correlation (docs/design.md section 6) of ``psi`` and of the OT transport ray with
the actual change ``Phi^perturbed(z0) - Phi^base(z0)``.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import solver_settings
from diffsens_cli.core.compare import correlation
from diffsens_cli.core.stats import bootstrap_interval, paired
from diffsens_cli.core.transport import METRICS
from diffsens_cli.errors import number, one_of, require, whole
from diffsens_cli.pipelines.shared.image_stages import ImageStages, check_training
from diffsens_cli.plots import images as plots
from diffsens_cli.rundir import RunDir, dotted
from diffsens_cli.sharding import finish_partial

MODES = ("retrain", "finetune")
STAGES = ("train_base", "train_retrain", "train_finetune", "sensitivity", "samples_retrain", "samples_finetune",
          "ot_retrain", "ot_finetune", "network_dtype_check")
FIGURES = {"retrain": ("fig5_retrain_correlations", "fig7_retrain_changes"),
           "finetune": ("fig6_finetune_correlations", "fig7_finetune_changes")}


def check(cfg: DictConfig) -> None:
    check_training(cfg)
    solver_settings(cfg.solver)
    pc = cfg.predict
    whole(pc.num_samples, "predict.num_samples", at_least=2)
    whole(pc.grid_samples, "predict.grid_samples", at_least=1)
    modes = OmegaConf.to_container(pc.modes)
    require(isinstance(modes, list) and len(modes) >= 1, "predict.modes", f"must list some of {', '.join(MODES)}")
    for m in modes:
        one_of(m, MODES, "predict.modes")
    require(cfg.perturbation.get("direction", "add") == "add", "perturbation.direction",
            "retraining and fine-tuning add S to the training data: use direction=add")
    require(number(cfg.ot.reg, "ot.reg") > 0, "ot.reg", f"must be > 0, got {cfg.ot.reg}")
    one_of(cfg.ot.metric, METRICS, "ot.metric")


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    stages = ImageStages(cfg, run.cache)
    n = int(cfg.predict.num_samples)
    modes = OmegaConf.to_container(cfg.predict.modes)
    base_model = stages.base()
    base_key, base = stages.sensitivity(base_model, n)
    after = {mode: stages.samples(stages.trained(mode), n) for mode in modes}
    if base is None:  # one job of a sharded run: its share is cached, the unsharded run assembles
        return finish_partial(run, stages.shard, stages.blocks_mine, stages.blocks_all)
    psi = torch.from_numpy(base["psi"][0])  # the one set S

    arrays = {k: base[k] for k in ("z0", "samples", "logp")} | {"psi": psi.numpy()}
    metrics, figures = {}, []
    for mode in modes:
        perturbed = after[mode]["samples"]
        change = torch.from_numpy(perturbed - base["samples"])
        rays = torch.from_numpy(stages.transport(mode, (base_key, base))["rays"])
        corr, corr_ot = correlation(psi, change).numpy(), correlation(rays, change).numpy()
        arrays |= {f"{mode}/samples": perturbed, f"{mode}/change": change.numpy(), f"{mode}/ot_rays": rays.numpy(),
                   f"{mode}/corr": corr, f"{mode}/corr_ot": corr_ot}
        metrics[mode] = _comparison(corr, corr_ot, psi, change) | _beyond_common_shift(psi, rays, change)
        hist, grid = FIGURES[mode]
        figures += run.save_figure(plots.correlation_histograms([(f"{mode}: {cfg.name}", corr, corr_ot)]), hist)
        k = int(cfg.predict.grid_samples)
        figures += run.save_figure(plots.change_grid(base["samples"][:k], perturbed[:k], psi[:k].numpy(),
                                                     change[:k].numpy(), title=f"{mode}: {cfg.name}", ncol=k), grid)

    run.save_arrays("arrays", arrays)
    sizes = {"rho": len(stages.rho), "S": len(stages.S)}
    weights = {k.split("/")[1]: int(v[0]) for k, v in base.items() if k.startswith("weights/")}
    paper = OmegaConf.to_container(cfg.predict.paper) if cfg.predict.get("paper") else None
    run.warn_if_zero_psi(psi.numpy(), weights)
    run.write_summary(metrics, _reasons(metrics), paper=paper, num_samples=n, sizes=sizes, weights=weights,
                      device=str(stages.device), dtype=str(stages.dtype), network_dtype=cfg.solver.network_dtype,
                      figures=figures)
    for mode, m in metrics.items():
        print(f"{cfg.name} {mode}: median correlation {m['median_corr']:.3f} (OT baseline {m['median_corr_ot']:.3f}) "
              f"over {m['num_samples']} samples; after removing the mean shift {m['median_corr_centered']:.3f} "
              f"(OT {m['median_corr_centered_ot']:.3f}); the mean shift alone {m['median_corr_mean_shift']:.3f}")


def _reasons(metrics: dict) -> dict[str, str]:
    """Why a headline number of ``_comparison`` may be NaN, by its summary path."""
    why = {"median_corr": "no sample had a finite correlation (psi or the change is constant)",
           "median_corr_ot": "no sample had a finite OT correlation (a ray or the change is constant)",
           "fraction_ours_better": "no sample had both correlations finite",
           "median_corr_centered": "no sample had a finite correlation after removing the mean shift",
           "median_corr_centered_ot": "no sample had a finite OT correlation after removing the mean shift",
           "median_corr_mean_shift": "no sample had a finite correlation with the others' mean change",
           "fraction_ours_better_centered": "no sample had both centred correlations finite",
           "median_fitted_eta": "psi of some sample is zero or non-finite (the fitted scale is 0/0)"}
    return {dotted("metrics", mode, key): text for mode in metrics for key, text in why.items()}


def _comparison(corr: np.ndarray, corr_ot: np.ndarray, psi: torch.Tensor, change: torch.Tensor) -> dict:
    """Headline numbers of one mode: medians (NaN-aware: a constant image has no
    correlation) with bootstrap intervals, how often ours beats OT (ties half) with the sign
    test's p-value, and the least-squares scale of ``psi`` that
    best matches the change (its median: how large an eta ``psi`` predicts)."""
    u, v = psi.flatten(1).double(), change.flatten(1).double()
    scale = (u * v).sum(1) / (u * u).sum(1)
    versus = paired(corr, corr_ot)
    interval, interval_ot = bootstrap_interval(corr), bootstrap_interval(corr_ot)
    return {"median_corr": float(np.nanmedian(corr)), "median_corr_ot": float(np.nanmedian(corr_ot)),
            "median_corr_ci": [interval["ci_low"], interval["ci_high"]],
            "median_corr_ot_ci": [interval_ot["ci_low"], interval_ot["ci_high"]],
            "num_samples": int(np.isfinite(corr).sum()), "num_samples_ot": int(np.isfinite(corr_ot).sum()),
            "fraction_ours_better": versus["win_rate"],
            "p_value_ours_vs_ot": versus["p_value"],
            "median_fitted_eta": float(scale.median())}


def _beyond_common_shift(psi: torch.Tensor, rays: torch.Tensor, change: torch.Tensor) -> dict:
    """Is the prediction more than a shift shared by all samples? The correlations of ours
    and OT with the change after each has its mean over samples removed, the ``mean_shift``
    baseline (each sample predicted to move by the mean actual change of the others), the
    share of the change's energy that the common shift carries, and how often ours beats
    OT after centring (with the sign test's p-value)."""
    u, r, c = (x.flatten(1).double() for x in (psi, rays, change))
    n = len(c)
    others = (c.sum(0, keepdim=True) - c) / max(n - 1, 1)  # leave-one-out: no sample predicts itself

    def centred(x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)

    corr, corr_ot = correlation(centred(u), centred(c)).numpy(), correlation(centred(r), centred(c)).numpy()
    corr_mean = correlation(others, c).numpy()
    versus = paired(corr, corr_ot)
    return {"median_corr_centered": float(np.nanmedian(corr)), "median_corr_centered_ot": float(np.nanmedian(corr_ot)),
            "median_corr_mean_shift": float(np.nanmedian(corr_mean)),
            "mean_shift_energy": float(c.mean(0).square().sum() / c.square().sum(1).mean()),
            "fraction_ours_better_centered": versus["win_rate"], "p_value_ours_vs_ot_centered": versus["p_value"]}
