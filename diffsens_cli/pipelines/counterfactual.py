"""Do influence scores predict what retraining without the images does?  The evaluation
attribution methods are judged by (counterfactual removal, and a linear datamodeling
score over random subsets), on the influence scores of ``pipelines.influence``.

- Counterfactual: for each of the first ``counterfactual.queries`` model samples and each
  ranking of the N training images (a score set, or ``ours``, ``random`` with
  ``counterfactual.random_seeds`` seeds, ``least``: our bottom), remove the top k,
  retrain from the same initialisation and seeds, sample from the same z0, and
  measure |Delta x| / |x| and the correlation of Delta x with the predicted change
  ``-(k / (N - k)) mean_R psi^n`` (``core.counterfactual``), and the change of the
  sample's denoising loss; per ranking and k, medians with intervals and paired sign
  tests (``removal_metrics``).  The noise floor is the full data retrained with
  ``counterfactual.floor_seeds`` other training seeds.
- Datamodeling: retrain on J random halves; per model sample and subset, the correlation
  of the actual change with the predicted one, and the Spearman correlation over subsets
  of |predicted| and |actual| (an LDS for samples), against an L2-kernel baseline; and
  the LDS of every score set of ``influence.attributions`` for two outputs, the sample's
  loss and its move (``lds_metrics``), with bootstrap intervals.

Retrainings of a network share the full-data training's batch draws
(``training.source.SharedDraws``), so a removal changes the batches only where removed
images were drawn.  Each retraining and each model's samples is its own cached stage,
keyed by the removed images' content; on synthetic data the model is the exact score of
the kept points (``counterfactual_closed_form``), so the first-order prediction can be
checked against the exact change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli import progress
from diffsens_cli.builders import build_schedule, solver_settings
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.compare import correlation, relative_difference, spearman_rows
from diffsens_cli.core.counterfactual import (
    PREDICTIONS,
    datamodel_predictions,
    kernel_removal_prediction,
    random_halves,
    removal_mix,
    top_k_mask,
    variance_above_floor,
)
from diffsens_cli.core.forcing import EmpiricalForcing
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.stats import bootstrap_interval, lds, paired
from diffsens_cli.data import data_depends
from diffsens_cli.errors import listed, number, one_of, plain, require, whole
from diffsens_cli.pipelines import influence
from diffsens_cli.pipelines.shared import attribution
from diffsens_cli.plots import evaluation as plots
from diffsens_cli.rundir import RunDir
from diffsens_cli.sharding import Shard, finish_partial
from diffsens_cli.stages import ArrayDict, content_key

STAGES = ("influence", "attribution_features", "attribution", "train_counterfactual", "samples_counterfactual",
          "loss_counterfactual", "predictions_counterfactual", "network_dtype_check")


# -- settings --------------------------------------------------------------------------
def removal_sizes(cfg: DictConfig, n: int) -> list[int]:
    """``counterfactual.remove`` as counts k: a float in (0, 1) is a fraction of N (at
    least one image), a whole number a count; every k must leave some training image."""
    sizes = []
    for i, value in enumerate(listed(cfg.counterfactual.remove, "counterfactual.remove", number)):
        key = f"counterfactual.remove[{i}]"
        k = max(1, round(value * n)) if 0 < value < 1 else whole(value, key)
        require(k >= 1, key, f"must be a fraction in (0, 1) or a count >= 1, got {value}")
        require(k < n, key, f"k = {k} must be below the number of training images N = {n}")
        sizes.append(k)
    return sorted(set(sizes))


def removal_columns(cfg: DictConfig) -> list[tuple[str, int]]:
    """The removal columns ``(ranking, replicate)``: each of ``counterfactual.rankings``
    once, ``random`` once per ``counterfactual.random_seeds`` (its result per query is the
    mean over them)."""
    seeds = int(cfg.counterfactual.random_seeds)
    return [(name, s) for name in plain(cfg.counterfactual.rankings) for s in range(seeds if name == "random" else 1)]


def removal_queries(cfg: DictConfig) -> int:
    """How many model samples have removals: the first ``counterfactual.queries`` of
    ``influence.samples`` (null: all); the LDS scores every one."""
    count, total = cfg.counterfactual.queries, len(influence.sample_indices(cfg))
    if count is None:
        return total
    count = whole(count, "counterfactual.queries")
    require(1 <= count <= total, "counterfactual.queries",
            f"must be null or in 1 .. {total} (the number of influence.samples), got {count}")
    return count


def check(cfg: DictConfig) -> None:
    """Every setting, and the data and model (``influence.check``), before any work."""
    require(cfg.model.kind != "pretrained", "model.kind",
            "counterfactual retraining trains a network from scratch on each subset of the data: give its "
            "architecture (model=unet or mlp), not model=pretrained")
    influence.check(cfg)
    cc, dm = cfg.counterfactual, cfg.datamodel
    rankings = listed(cc.rankings, "counterfactual.rankings",
                      lambda v, key: one_of(v, attribution.RANKINGS, key))
    require(len(set(rankings)) == len(rankings), "counterfactual.rankings", f"lists a ranking twice: {rankings}")
    attribution.check_rankings(cfg, rankings, "counterfactual.rankings")
    whole(cc.shown, "counterfactual.shown", at_least=1)
    whole(cc.examples, "counterfactual.examples", at_least=0)
    whole(cc.random_seeds, "counterfactual.random_seeds", at_least=1)
    removal_queries(cfg)
    floor_seeds = whole(cc.floor_seeds, "counterfactual.floor_seeds")
    require(floor_seeds >= 2, "counterfactual.floor_seeds",
            f"must be >= 2 (the noise floor is a variance over seeds), got {floor_seeds}")
    subsets = whole(dm.subsets, "datamodel.subsets")
    require(subsets >= 2, "datamodel.subsets", f"must be >= 2 (a rank correlation over subsets), got {subsets}")
    keep = number(dm.keep, "datamodel.keep")
    require(0 < keep < 1, "datamodel.keep", f"must be in (0, 1), got {keep}")
    for i, b in enumerate(listed(dm.bandwidths, "datamodel.bandwidths", number)):
        require(b > 0, f"datamodel.bandwidths[{i}]", f"must be > 0, got {b}")
    if influence.closed_form(cfg):
        n = int(cfg.influence.num_train)
    else:
        require(cfg.influence.num_train is None, "influence.num_train",
                "counterfactuals remove images from the whole training set: leave it null (dataset.limit "
                "trains on fewer)")
        n = _num_images(cfg)
    influence.check_num_train(cfg, n)
    removal_sizes(cfg, n)
    require(1 <= round(keep * n) < n, "datamodel.keep", f"must keep some but not all of N = {n} images, got {keep}")
    require(cfg.solver.method == "ode", "solver.method",
            "counterfactual samples are compared along one deterministic path per z0: use method=ode")


def _num_images(cfg: DictConfig) -> int:
    """N for an image data set, from its loader (the embedded ones load in well under a second)."""
    from diffsens_cli.data import load_images

    return len(load_images(cfg.dataset))


def digest(removed: torch.Tensor) -> str:
    """A removal set's content key: the sorted positions of the removed images."""
    return content_key(torch.nonzero(removed).flatten().numpy().astype(np.int64))


# -- models retrained without some images ---------------------------------------------------
@dataclass
class Models:
    """The reference (full-data) model as an influence ``Source``; ``samples(removed,
    train_seed)``: the model samples [M, *event] from the rows ``rows`` of z0 of the model
    trained without the ``removed`` images (bool [N]); and ``losses(removed, train_seed,
    queries)``: that model's denoising loss [M] of the query samples [M, *event]
    (``query_loss``)."""

    source: influence.Source
    samples: Callable[[torch.Tensor, int], np.ndarray]
    losses: Callable[[torch.Tensor, int, np.ndarray], np.ndarray]
    rows: list[int]


def query_loss(cfg: DictConfig, model, queries: np.ndarray, device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """The field's output for attribution: each query's denoising loss [M] under ``model``,
    averaged over the fixed (time, noise) pairs ``influence.loss_pairs`` (the pairs of
    ``ours_loss`` and ``dtrak``, ``core.trak.output_pairs``)."""
    from diffsens_cli.core.attribution import denoising_loss
    from diffsens_cli.core.trak import output_pairs

    pairs = cfg.influence.loss_pairs
    x = torch.from_numpy(queries).to(device, dtype)
    times, noises = output_pairs(int(pairs.timesteps), int(pairs.noises), tuple(x.shape[1:]), int(cfg.seed), dtype,
                                 device)
    with torch.no_grad():
        return denoising_loss(model, x, times, noises).cpu().numpy()


def image_models(cfg: DictConfig, run: RunDir, rows: list[int]) -> Models:
    """Networks trained from the same initialisation and seeds with shared batch draws,
    each a ``train_counterfactual`` stage, and their samples, ``samples_counterfactual``."""
    from diffsens_cli.models.unet import build_network_model
    from diffsens_cli.pipelines.shared.image_stages import ImageStages
    from diffsens_cli.training.settings import train_settings, training_depends
    from diffsens_cli.training.source import SharedDraws

    stages = ImageStages(cfg, run.cache)
    rho = stages.rho

    def trained(removed: torch.Tensor, train_seed: int) -> tuple[str, Path]:
        train = OmegaConf.merge(cfg.train, {"seed": train_seed, "mode": "base"})
        depends = training_depends(cfg, train, str(stages.dtype)) | {"draws": "shared", "removed": digest(removed)}
        del depends["train"]["mode"]  # base trainings on a subset: their stage keys never named the mode

        def work(path: Path) -> None:
            model = build_network_model(cfg.model, stages.event_shape, build_schedule(cfg.schedule),
                                        dtype=stages.dtype, forward_ad=False)
            model.net.train()
            # the full data set's epochs in optimizer steps: the same number for every removal
            settings = train_settings(train, len(rho))
            stages.train_network(path, model, SharedDraws(rho.images, ~removed), settings, depends)

        path = run.cache.run("train_counterfactual", depends, work)
        return f"train_counterfactual/{path.name}", path / "model"

    def losses(removed: torch.Tensor, train_seed: int, queries: np.ndarray) -> np.ndarray:
        key, path = trained(removed, train_seed)
        depends = {"model": key, "queries": content_key(queries), "loss_pairs": plain(cfg.influence.loss_pairs),
                   "seed": int(cfg.seed)}
        return run.cache.arrays("loss_counterfactual", depends, lambda: {"loss": query_loss(
            cfg, stages.score_model(path), queries, stages.device, stages.dtype)})["loss"]

    pool = int(cfg.influence.pool)
    nothing = torch.zeros(len(rho), dtype=torch.bool)
    model_key, model_dir = trained(nothing, int(cfg.train.seed))
    model = stages.score_model(model_dir)
    integrated = stages.integration_model((model_key, model_dir))
    everything = torch.arange(len(rho))
    source = influence.Source(model, rho.images.to(stages.device, stages.dtype), rho.labels, everything,
                              stages.z0(model, pool), {"model": model_key, "dataset": data_depends(cfg.dataset)},
                              influence.training_names(cfg, rho.names, everything),
                              half=integrated if integrated is not model else None)
    return Models(source, lambda removed, seed: stages.samples_of_rows(trained(removed, seed), pool, rows)["samples"],
                  losses, rows)


def exact_models(cfg: DictConfig, rows: list[int]) -> Models:
    """On synthetic data the model trained on the kept points is their exact score: no
    training, no training noise (every training seed gives the same model)."""
    source = influence.closed_form_source(cfg)
    settings = solver_settings(cfg.solver)

    def model(removed: torch.Tensor) -> MixtureScore:
        kept = source.points[~removed.to(source.points.device)]
        return MixtureScore(GaussianMixture.empirical(kept), source.model.schedule)

    def samples(removed: torch.Tensor, train_seed: int) -> np.ndarray:
        return Integrator(model(removed), settings).run(source.z0[rows]).samples.cpu().numpy()

    def losses(removed: torch.Tensor, train_seed: int, queries: np.ndarray) -> np.ndarray:
        return query_loss(cfg, model(removed), queries, source.points.device, source.points.dtype)

    return Models(source, samples, losses, rows)


# -- the experiment ----------------------------------------------------------------------
def _predictions(cfg: DictConfig, run: RunDir, source: influence.Source, i: int, removed: torch.Tensor) -> np.ndarray:
    """Stage: the predicted changes [len(PREDICTIONS), R, *event] of model sample ``i``
    after each removal (bool [R, N]), with each kind of removal weights
    (``core.counterfactual.removal_mix``): one forward tangent each along the sample's path."""
    from diffsens_cli.pipelines.shared.image_stages import solver_depends

    depends = {"source": source.model_key, "solver": solver_depends(cfg.solver), "pool": int(cfg.influence.pool),
               "sample": i, "seed": int(cfg.seed), "removed": [digest(r) for r in removed], "weights": PREDICTIONS}

    def compute() -> ArrayDict:
        points = source.points
        mix = torch.cat([removal_mix(removed, w) for w in PREDICTIONS]).to(points.device, points.dtype)
        out = Integrator(source.integrated, solver_settings(cfg.solver), EmpiricalForcing(points, mix=mix[:, None]))
        psi = out.run(source.z0[i:i + 1], first_index=i).psi[:, 0]
        return {"psi": psi.view(len(PREDICTIONS), len(removed), *psi.shape[1:]).numpy()}

    return run.cache.arrays("predictions_counterfactual", depends, compute)["psi"]


@dataclass
class Retrained:
    """The model samples and query losses of the experiment, per model sample m of M: the
    full-data model's (``base`` [M, *event], ``base_loss`` [M]) and F other training
    seeds' (``floor`` [F, M, *event], ``floor_loss`` [F, M]); for the first Q model samples
    (the removal queries), after each removal column's removals (``removed`` [Q, columns,
    ks, N], ``after`` [Q, columns, ks, *event], ``after_loss`` [Q, columns, ks],
    ``predicted`` [P, Q, columns, ks, *event] for the P = len(PREDICTIONS) kinds of
    removal weights; ``removal_columns``) and for every sample after each random subset's
    (``subsets`` removed [J, N], ``after_subsets`` [M, J, *event], ``subset_loss`` [M, J],
    ``predicted_subsets`` [P, M, J, *event]).  The losses are each model's denoising loss
    of the full-data model's samples (``query_loss``)."""

    base: np.ndarray
    base_loss: np.ndarray
    floor: np.ndarray
    floor_loss: np.ndarray
    removed: torch.Tensor
    after: np.ndarray
    after_loss: np.ndarray
    predicted: np.ndarray
    subsets: torch.Tensor
    after_subsets: np.ndarray
    subset_loss: np.ndarray
    predicted_subsets: np.ndarray


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    rows = influence.sample_indices(cfg)
    models = exact_models(cfg, rows) if influence.closed_form(cfg) else image_models(cfg, run, rows)
    source, shard = models.source, Shard.of(cfg)
    # every job of a sharded run needs every sample's scores: each computes its own first
    groups = influence.query_groups(cfg, rows)
    found = influence.sample_stages(cfg, run, source, shard.mine(groups))
    found |= influence.sample_stages(cfg, run, source, [g for g in groups if g[0] not in found], compute=False)
    per_sample = [found[i] for i in rows]
    columns, ks = removal_columns(cfg), removal_sizes(cfg, len(source.points))
    sets, _ = attribution.score_sets(cfg, run, source, rows, per_sample,  # all: each has its LDS
                                     [influence.stage_depends(cfg, source, i) for i in rows])
    orders = [attribution.ranking_orders(columns, sets, m, len(source.points), int(cfg.seed))
              for m in range(removal_queries(cfg))]
    out = _retrain(cfg, run, models, orders, ks, shard)
    if out is None:  # one job of a sharded run: the unsharded run assembles
        return
    _report(cfg, run, models, per_sample, sets, columns, orders, ks, out)


def _retrain(cfg: DictConfig, run: RunDir, models: Models, orders: list[list[torch.Tensor]],
             ks: list[int], shard: Shard) -> Retrained | None:
    """Every retraining (each unique removal set once) and every prediction; in one job of
    a sharded run, its share of them (and None).  ``orders``: per removal query (the first
    ``len(orders)`` model samples), each removal column's order."""
    n, m_count, q_count, c_count = len(models.source.points), len(models.rows), len(orders), len(orders[0])
    removed = torch.stack([top_k_mask(order, k) for o in orders for order in o for k in ks])
    removed = removed.view(q_count, c_count, len(ks), n)
    subsets = ~random_halves(n, float(cfg.datamodel.keep), int(cfg.datamodel.subsets), int(cfg.seed))  # [J, N]
    train_seed, nothing = int(cfg.train.seed), torch.zeros(n, dtype=torch.bool)
    unique = {digest(r): r for r in [*removed.flatten(0, 2), *subsets]}
    # the reference model, each removal, and the noise floor (the full data, other training seeds)
    floors = [f"floor{s}" for s in range(1, int(cfg.counterfactual.floor_seeds) + 1)]
    trainings = [("base", nothing, train_seed), *((key, r, train_seed) for key, r in unique.items()),
                 *((key, nothing, train_seed + s) for s, key in enumerate(floors, start=1))]
    shows = bool(cfg.solver.progress)
    queries = models.samples(nothing, train_seed)  # the full-data model's samples, whose loss each model scores
    done = {key: (models.samples(r, seed), models.losses(r, seed, queries))
            for key, r, seed in progress.bar(shard.mine(trainings), desc="counterfactual: retrainings", enabled=shows)}
    removals = [torch.cat([removed[m].flatten(0, 1), subsets]) if m < q_count else subsets for m in range(m_count)]
    samples = shard.mine(list(enumerate(models.rows)), first=len(trainings))  # numbered on from the trainings
    predictions = [_predictions(cfg, run, models.source, i, removals[m])
                   for m, i in progress.bar(samples, desc="predicted changes", enabled=shows)]
    if shard.partial:
        finish_partial(run, shard, len(done) + len(samples), len(trainings) + m_count)
        return None
    cut = c_count * len(ks)  # each removal query's predictions: its removals, then the subsets
    flat = [(m, digest(mask)) for m in range(q_count) for mask in removed[m].flatten(0, 1)]
    after = np.stack([done[key][0][m] for m, key in flat]).reshape(*removed.shape[:3], *queries.shape[1:])
    after_loss = np.array([done[key][1][m] for m, key in flat]).reshape(removed.shape[:3])
    predicted = np.stack([p[:, :cut] for p in predictions[:q_count]], axis=1)  # [P, Q, columns * ks, *event]
    return Retrained(done["base"][0], done["base"][1], np.stack([done[f][0] for f in floors]),
                     np.stack([done[f][1] for f in floors]), removed, after, after_loss,
                     predicted.reshape(len(PREDICTIONS), *after.shape), subsets,
                     np.stack([done[digest(s)][0] for s in subsets], axis=1),
                     np.stack([done[digest(s)][1] for s in subsets], axis=1),
                     np.stack([p[:, p.shape[1] - len(subsets):] for p in predictions], axis=1))


def _report(cfg: DictConfig, run: RunDir, models: Models, per_sample: list[ArrayDict], sets: dict[str, np.ndarray],
            columns: list[tuple[str, int]], orders: list[list[torch.Tensor]], ks: list[int], out: Retrained) -> None:
    """Metrics, arrays, figures and the summary."""
    names, closed = list(plain(cfg.counterfactual.rankings)), influence.closed_form(cfg)
    points = models.source.points.cpu()
    counterfactual, arrays = counterfactual_metrics(out, columns, names, ks)
    datamodeling, more, panels = datamodeling_metrics(out, points, cfg.datamodel)
    scores, noise, lds_arrays = lds_metrics(out, sets, int(cfg.seed))
    lds_pairwise = {output: paired_queries(methods) for output, methods in scores.items()}
    removal = removal_metrics(arrays["counterfactual/change"], arrays["counterfactual/loss_change"], names, ks,
                              int(cfg.seed))
    counterfactual |= {"num_train": len(points), "num_samples": len(orders), "random_seeds": int(
        cfg.counterfactual.random_seeds)}
    arrays |= more | lds_arrays | {
        "sample_index": np.array(models.rows), "z0": models.source.z0[models.rows].cpu().numpy(),
        "base": out.base, "floor": out.floor, "base_loss": out.base_loss, "floor_loss": out.floor_loss,
        "counterfactual/retrained_loss": out.after_loss, "datamodel/retrained_loss": out.subset_loss,
        "influence/scores": sets["ours"],
        **{f"influence/{name}/scores": values for name, values in sets.items() if name != "ours"},
        "influence/l2": np.stack([a["l2"] for a in per_sample])}
    if closed:
        arrays["train_points"] = points.numpy()
    run.save_arrays("arrays", arrays)
    figures = run.save_figure(plots.counterfactual(names, ks, arrays["counterfactual/change"],
                                                   arrays["counterfactual/floor_change"], removal),
                              "fig_counterfactual")
    examples = min(int(cfg.counterfactual.examples), len(orders))
    if not closed and examples:
        firsts = [c for c, (_, replicate) in enumerate(columns) if replicate == 0]  # one column per ranking
        shown = min(int(cfg.counterfactual.shown), ks[-1])
        removed_images = points[torch.stack([torch.stack([orders[m][c][:shown] for c in firsts])
                                             for m in range(examples)])].numpy()
        figures += run.save_figure(plots.removal_examples(names, ks[-1], out.base[:examples],
                                                          out.after[:examples][:, firsts, -1], removed_images),
                                   "fig_removal_examples")
    figures += run.save_figure(plots.datamodeling(*panels), "fig_datamodeling")
    figures += run.save_figure(plots.lds_intervals(scores), "fig_lds")
    run.write_summary({"counterfactual": counterfactual, "datamodeling": datamodeling, "lds": scores,
                       "lds_pairwise": lds_pairwise, "removal": removal, "noise_floor": noise}, figures=figures,
                      solver=plain(cfg.solver), **({} if closed else {"train": plain(cfg.train)}))
    for name in names:  # the removal table: median move over queries [95% interval], and ours' prediction
        print(f"{name:>12}: " + "; ".join(
            f"k={k} change {removal[name][f'k{k}']['median_change']:.3f} [{removal[name][f'k{k}']['ci_low']:.3f}, "
            f"{removal[name][f'k{k}']['ci_high']:.3f}] corr {counterfactual[name][f'k{k}']['median_corr_pred']:.3f}"
            for k in ks))
    print(f"noise floor {counterfactual['noise_floor']:.3f}; datamodeling: corr {datamodeling['median_corr']:.3f} "
          f"(L2 kernel {datamodeling['median_corr_l2kernel']:.3f}), LDS {datamodeling['lds']:.3f} "
          f"(L2 kernel {datamodeling['lds_l2kernel']:.3f})")
    for output, methods in scores.items():
        print(f"LDS of the {output} over {datamodeling['subsets']} subsets (variance above the noise floor "
              f"{noise[output]['variance_above_floor']:.2f}): " + "; ".join(
                  f"{name} {v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for name, v in methods.items()))


def _nanmedian(values: np.ndarray) -> float:
    """The median of the defined values; NaN, without numpy's warning, when none is (a
    correlation with a change of zero: the summary lists it under ``null_values``)."""
    defined = np.asarray(values, dtype=float)
    defined = defined[~np.isnan(defined)]
    return float(np.median(defined)) if defined.size else float("nan")


def _correlations(predicted: np.ndarray, actual: np.ndarray, event_dims: int) -> np.ndarray:
    """The correlation of each predicted change with its actual one: ``actual`` [..., *event]
    (``event_dims`` axes) broadcast against ``predicted``; returns ``predicted``'s leading axes."""
    lead = predicted.shape[:predicted.ndim - event_dims]
    pairs = (int(np.prod(lead)), -1)
    p = torch.from_numpy(predicted)
    return correlation(p.reshape(pairs), torch.from_numpy(actual).expand_as(p).reshape(pairs)).numpy().reshape(lead)


def _suffix(kind: str) -> str:
    """Summary keys of the issue's prediction (``removed``) plain, the other suffixed."""
    return "" if kind == PREDICTIONS[0] else f"_{kind}"


def column_label(name: str, replicate: int) -> str:
    """A removal column's name in the arrays: the ranking, and ``:<replicate>`` after the first."""
    return name if replicate == 0 else f"{name}:{replicate}"


def pool_replicates(values: np.ndarray, columns: list[tuple[str, int]], names: list[str], axis: int) -> np.ndarray:
    """Per ranking, the mean over its replicate columns (``random``'s seeds) along ``axis``:
    the columns' axis becomes the rankings'."""
    index = np.array([names.index(name) for name, _ in columns])
    return np.stack([np.take(values, np.flatnonzero(index == r), axis=axis).mean(axis) for r in range(len(names))],
                    axis=axis)


def counterfactual_metrics(out: Retrained, columns: list[tuple[str, int]], names: list[str],
                           ks: list[int]) -> tuple[dict[str, Any], ArrayDict]:
    """Per ranking and k: the median over removal queries of |Delta x| / |x| and of the
    correlation of Delta x with each predicted change (``random``: per query the mean over
    its seeds); the noise floor's |Delta x| / |x| and relative loss change, the same way (per
    query the mean over the floor's seeds, then the median over queries)."""
    event_dims = out.base.ndim - 1
    base, base_loss = out.base[:len(out.removed)], out.base_loss[:len(out.removed)]
    change = out.after - base[:, None, None]  # [Q, columns, ks, *event]
    per_column = relative_difference(out.after.reshape(-1, *base.shape[1:]),
                                     np.repeat(base, len(columns) * len(ks), axis=0)).reshape(change.shape[:3])
    loss_per_column = out.after_loss / base_loss[:, None, None] - 1  # [Q, columns, ks]
    corr_per_column = _correlations(out.predicted, change, event_dims)  # [P, Q, columns, ks]
    size, loss_change = (pool_replicates(v, columns, names, 1) for v in (per_column, loss_per_column))
    corr = pool_replicates(corr_per_column, columns, names, 2)
    floors = np.stack([relative_difference(f[:len(base)], base) for f in out.floor])  # [F, Q]
    floor = floors.mean(0)
    metrics: dict[str, Any] = {
        name: {f"k{k}": {"median_change": float(np.median(size[:, r, j])),
                         **{f"median_corr_pred{_suffix(p)}": _nanmedian(corr[c, :, r, j])
                            for c, p in enumerate(PREDICTIONS)},
                         "median_loss_change": float(np.median(loss_change[:, r, j])),
                         "change_per_sample": size[:, r, j].tolist(), "corr_pred_per_sample": corr[0, :, r, j].tolist(),
                         "loss_change_per_sample": loss_change[:, r, j].tolist()}
               for j, k in enumerate(ks)} for r, name in enumerate(names)}
    floor_loss = np.abs(out.floor_loss[:, :len(base)] / base_loss - 1).mean(0)  # [Q]
    metrics |= {"noise_floor": float(np.median(floor)), "noise_floor_per_sample": floor.tolist(),
                "noise_floor_loss": float(np.median(floor_loss)),
                "floor_seeds": len(floors), "k": ks}
    arrays = {"counterfactual/columns": np.array([column_label(*c) for c in columns]),
              "counterfactual/removed": out.removed.numpy(), "counterfactual/retrained": out.after,
              "counterfactual/predicted": out.predicted, "counterfactual/change": size,
              "counterfactual/change_per_column": per_column, "counterfactual/loss_change": loss_change,
              "counterfactual/loss_change_per_column": loss_per_column, "counterfactual/corr_pred": corr,
              "counterfactual/floor_change": floor, "counterfactual/floor_changes": floors}
    return metrics, arrays


def removal_metrics(change: np.ndarray, loss_change: np.ndarray, names: list[str], ks: list[int],
                    seed: int) -> dict[str, Any]:
    """The removal table, from the per-query results [M, rankings, ks] of
    ``counterfactual_metrics`` (``change``: |Delta x| / |x|; ``loss_change``: the relative
    change of the query's loss): per ranking and k the medians over queries with bootstrap
    95% intervals, and for every pair of rankings, per k, how often the first moves the
    query further than the second, with the exact sign test's p-value."""
    out: dict[str, Any] = {}
    for r, name in enumerate(names):
        out[name] = {}
        for j, k in enumerate(ks):
            moved, loss = (bootstrap_interval(v[:, r, j], seed=seed) for v in (change, loss_change))
            out[name][f"k{k}"] = {"median_change": moved["value"], "ci_low": moved["ci_low"],
                                  "ci_high": moved["ci_high"], "median_loss_change": loss["value"],
                                  "loss_ci_low": loss["ci_low"], "loss_ci_high": loss["ci_high"]}
    out["pairwise"] = {f"{a}_vs_{b}": {f"k{k}": paired(change[:, r, j], change[:, q, j]) for j, k in enumerate(ks)}
                       for r, a in enumerate(names) for q, b in enumerate(names) if r < q}
    return out


def datamodeling_metrics(out: Retrained, points: torch.Tensor,
                         dm: DictConfig) -> tuple[dict[str, Any], ArrayDict, tuple[dict, dict, dict]]:
    """Over (sample, subset): the correlation of predicted and actual Delta x, and per
    sample the Spearman correlation over subsets of |predicted| and |actual| (the LDS),
    for ours and for the L2-kernel baseline, whose bandwidth is the one of
    ``dm.bandwidths`` (times the median sample-to-image distance) with the best median
    correlation on subset 0 (which is also scored: a head start for the baseline); also
    the panels of ``plots.datamodeling``."""
    base = torch.from_numpy(out.base)
    actual = out.after_subsets - out.base[:, None]  # [M, J, *event]
    m_count, j_count = actual.shape[:2]
    event_dims = out.base.ndim - 1
    scale = float(torch.cdist(base.flatten(1).double(), points.flatten(1).double()).median())
    bandwidths = [float(b) * scale for b in dm.bandwidths]

    def kernel(bandwidth: float) -> np.ndarray:  # [M, J, *event]
        pred = kernel_removal_prediction(base, points, out.subsets, bandwidth).transpose(0, 1)
        return pred.reshape(actual.shape).numpy()

    tuned = [_nanmedian(_correlations(kernel(b)[:, :1], actual[:, :1], event_dims)) for b in bandwidths]
    best = int(np.nanargmax(tuned)) if np.isfinite(tuned).any() else 0
    predictions = {f"ours{_suffix(p)}": out.predicted_subsets[c] for c, p in enumerate(PREDICTIONS)}
    predictions["l2kernel"] = kernel(bandwidths[best])
    norms = {name: np.linalg.norm(p.reshape(m_count, j_count, -1), axis=2)
             for name, p in (("actual", actual), *predictions.items())}
    lds = {name: spearman_rows(norms[name], norms["actual"]) for name in predictions}
    corr = {name: _correlations(p, actual, event_dims) for name, p in predictions.items()}
    metrics = {}
    for name in predictions:
        key = "" if name == "ours" else "_" + name.removeprefix("ours_")
        metrics |= {f"median_corr{key}": _nanmedian(corr[name]), f"lds{key}": _nanmedian(lds[name]),
                    f"lds{key}_per_sample": lds[name].tolist()}
    metrics |= {
        "median_change": float(np.median(norms["actual"] / np.linalg.norm(out.base.reshape(m_count, 1, -1), axis=2))),
        "subsets": j_count, "keep": float(dm.keep),
        "l2kernel_bandwidth": {"relative": float(dm.bandwidths[best]), "absolute": bandwidths[best],
                               "median_distance": scale, "chosen_on": "subset 0 (scored too), by median correlation",
                               "tried": dict(zip(map(str, plain(dm.bandwidths)), tuned, strict=True))},
    }
    arrays = {"datamodel/removed": out.subsets.numpy(), "datamodel/retrained": out.after_subsets,
              "datamodel/predicted": out.predicted_subsets, "datamodel/predicted_l2kernel": predictions["l2kernel"],
              **{f"datamodel/corr_{name}": c for name, c in corr.items()}}
    return metrics, arrays, (corr, norms, lds)


LDS_OUTPUTS = ("loss", "sample")


def paired_queries(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """For every pair of methods (in their order) of one output's LDS: on how many queries
    the first's Spearman correlation is the higher, with the sign test (``core.stats.paired``)."""
    names = list(methods)
    return {f"{a}_vs_{b}": paired(np.array(methods[a]["per_query"]), np.array(methods[b]["per_query"]))
            for i, a in enumerate(names) for b in names[i + 1:]}


def lds_metrics(out: Retrained, sets: dict[str, np.ndarray], seed: int) -> tuple[dict[str, Any], dict[str, Any],
                                                                                ArrayDict]:
    """The linear datamodeling score of every score set on the J random subsets, for two
    outputs of each query: ``loss``, its denoising loss under the retrained model, and
    ``sample``, how far its regenerated sample moves (``|x_S - x| / |x|``, from the same
    z0); each method's prediction is ``core.counterfactual.datamodel_predictions`` (and
    for ``sample`` also ``ours_vector``: the length of ours' predicted change
    ``sum_n w_n psi^n``, per query the same Spearman as ``datamodeling.lds``, whose
    summary is the median).  Mean Spearman over queries with a two-way bootstrap interval
    (``core.stats.lds``).  Also the noise floor: how much of each output's variance over
    subsets is above its variance over training seeds of the full data."""
    m_count, j_count = out.subset_loss.shape
    moved = relative_difference(out.after_subsets.reshape(m_count * j_count, *out.base.shape[1:]),
                                np.repeat(out.base, j_count, axis=0)).reshape(m_count, j_count)
    actual = {"loss": out.subset_loss, "sample": moved}  # [M, J] each
    floor = {"loss": np.concatenate([out.base_loss[None], out.floor_loss]),  # [F + 1, M]: every seed's loss
             "sample": np.stack([relative_difference(f, out.base) for f in out.floor])}  # [F, M]: the others' moves
    removed = out.subsets
    predicted = {name: datamodel_predictions(torch.from_numpy(values), removed).numpy()
                 for name, values in sets.items() if name != "ours"}
    vector = np.linalg.norm(out.predicted_subsets[0].reshape(*out.predicted_subsets.shape[1:3], -1), axis=2)
    scores: dict[str, Any] = {output: {} for output in LDS_OUTPUTS}
    for output in LDS_OUTPUTS:
        methods = predicted | ({"ours_vector": vector} if output == "sample" else {})
        for name, values in methods.items():
            scores[output][name] = lds(values, actual[output], seed=seed)
    above = {output: variance_above_floor(torch.from_numpy(actual[output]), torch.from_numpy(floor[output])).numpy()
             for output in LDS_OUTPUTS}
    noise = {output: {"variance_above_floor": float(np.median(above[output])),
                      "variance_above_floor_per_query": above[output].tolist(),
                      "subsets_spread": float(np.median(actual[output].std(1))),
                      "seeds_spread": float(np.median(floor[output].std(0))), "seeds": len(floor[output])}
             for output in LDS_OUTPUTS}
    arrays = {f"lds/actual_{output}": actual[output] for output in LDS_OUTPUTS} | {
        f"lds/predicted_{name}": values for name, values in predicted.items()} | {"lds/predicted_ours_vector": vector}
    return scores, noise, arrays
