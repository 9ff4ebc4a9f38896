"""Which training images does a generated image depend on?  Paper Sec. 4.4 (Figs. 8-10,
12-14): the influence score ``|psi^n|`` of every training image n on a few model
samples, its regression on L2 distance, and the singular directions of each sample's
``N x d`` sensitivity matrix (docs/design.md section 7, ``core.influence``).

The model is a trained image experiment's base model (its stage is reused), a model
brought with ``model=pretrained`` (``cifar10_crossclass``), or the exact score of N
points drawn from a synthetic data set (``influence_closed_form``).  Model
samples are rows ``influence.samples`` of the experiment's ``influence.pool`` starting
points (the same z0 as the experiment's own samples), several at a time
(``influence.query_batch``).  Each model sample is its own cached stage, so an
interrupted run resumes from the finished ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli import progress
from diffsens_cli.builders import Components, build_schedule, solver_settings
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.compare import linear_fit
from diffsens_cli.core.forcing import EmpiricalForcing
from diffsens_cli.core.influence import InfluenceSettings, influence
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.data import IMAGE_DATASETS, data_depends
from diffsens_cli.data.base import draw
from diffsens_cli.errors import listed, number, one_of, plain, require, whole
from diffsens_cli.pipelines.shared import attribution, crossclass, queries
from diffsens_cli.plots import influence as plots
from diffsens_cli.rundir import RunDir
from diffsens_cli.sharding import Shard, finish_partial
from diffsens_cli.stages import ArrayDict, content_key
from diffsens_cli.training.settings import train_settings

STAGES = ("train_base", "influence", "attribution_features", "attribution", "network_dtype_check")
METHODS = ("exact", "sketch")


def influence_settings(cfg: DictConfig) -> InfluenceSettings:
    """Checked ``InfluenceSettings`` from the ``influence`` group."""
    ic = cfg.influence
    out = InfluenceSettings(
        method=one_of(ic.method, METHODS, "influence.method"),
        projections=whole(ic.projections, "influence.projections", at_least=1),
        rank=whole(ic.rank, "influence.rank", at_least=1),
        oversample=whole(ic.oversample, "influence.oversample", at_least=0),
        power_iterations=whole(ic.power_iterations, "influence.power_iterations", at_least=0),
        seed=whole(cfg.seed, "seed"),
    )
    return out


def closed_form(cfg: DictConfig) -> bool:
    """Influence on synthetic (vector) data, where the model is the training points' exact score."""
    return cfg.dataset.kind not in IMAGE_DATASETS


def check(cfg: DictConfig) -> None:
    """Every setting, and the data and model, before any work."""
    settings = influence_settings(cfg)
    ic = cfg.influence
    pool = whole(ic.pool, "influence.pool", at_least=1)
    samples = sample_indices(cfg)
    for i in samples:
        require(0 <= i < pool, "influence.samples",
                f"index {i} is out of range: the pool has {pool} samples (0..{pool - 1})")
    require(len(set(samples)) == len(samples), "influence.samples", f"lists an index twice: {samples}")
    num_train = whole(ic.num_train, "influence.num_train", null=True, at_least=1)
    if ic.train_block != "auto":
        whole(ic.train_block, "influence.train_block", null=True, at_least=1)
    whole(ic.query_batch, "influence.query_batch", at_least=1)
    whole(ic.shown, "influence.shown", at_least=1)
    listed(ic.ray_amplitudes, "influence.ray_amplitudes", number)
    attribution.check(cfg, closed_form(cfg), labelled=not closed_form(cfg))
    solver_settings(cfg.solver)
    if closed_form(cfg):
        require(cfg.model.kind == "closed_form", "model.kind",
                f"influence on synthetic data uses the exact score of the training points (closed_form), "
                f"got {cfg.model.kind!r}")
        require(num_train is not None, "influence.num_train", "the closed-form model needs a number of points")
        Components(cfg)
        dim = int(cfg.dataset.dim)
        queries.check(cfg, (dim,))
    else:
        from diffsens_cli.pipelines.shared.image_stages import check_data_and_model

        require(cfg.solver.density == "ccov", "solver.density",
                "a network has no closed-form density: influence on images needs density=ccov (and method=ode)")
        train_settings(cfg.train, 1)
        build_schedule(cfg.schedule)
        shape = check_data_and_model(cfg, with_s=False)
        queries.check(cfg, tuple(shape))
        dim = int(np.prod(shape))
    if settings.method == "sketch" and settings.projections < dim:
        width = settings.rank + settings.oversample
        require(width <= settings.projections // 2, "influence.rank",
                f"rank + oversample ({width}) must not exceed half of influence.projections "
                f"({settings.projections} // 2) when the projections are fewer than the dimension ({dim}): "
                f"the other half estimates what the singular directions miss")
    if num_train is not None:
        check_num_train(cfg, num_train)
    if "crossclass" in cfg:
        held_out = number(cfg.crossclass.held_out, "crossclass.held_out")
        require(0 < held_out < 1, "crossclass.held_out", f"must be in (0, 1), got {held_out}")
        require(not closed_form(cfg), "crossclass", "needs a labelled image data set")
        one_of(cfg.crossclass.classifier, list(crossclass.CLASSIFIERS), "crossclass.classifier")
        whole(cfg.crossclass.epochs, "crossclass.epochs", at_least=1)
        require(isinstance(cfg.crossclass.flip, bool), "crossclass.flip",
                f"must be true or false, got {cfg.crossclass.flip}")


def check_num_train(cfg: DictConfig, n: int) -> None:
    """The checks that need the number N of training images."""
    require(n >= 1, "influence.num_train", "no training images are left")
    rank = int(cfg.influence.rank)
    require(rank <= n, "influence.rank", f"must not exceed the number of training images N = {n}, got {rank}")


def sample_indices(cfg: DictConfig) -> list[int]:
    """``influence.samples``: a list of rows of the pool, or a count n (rows 0..n-1)."""
    samples = plain(cfg.influence.samples)
    if isinstance(samples, int) and not isinstance(samples, bool):
        require(samples >= 1, "influence.samples", f"must be a list of rows or a count >= 1, got {samples}")
        return list(range(samples))
    return listed(samples, "influence.samples", whole)


@dataclass
class Source:
    """What the influence computation runs on: the score model, the training points
    [N, *event] (with labels where the data set has them), the pool of starting points
    and a key naming the model for the stage cache."""

    model: ScoreModel
    points: torch.Tensor
    labels: torch.Tensor | None
    train_index: torch.Tensor
    z0: torch.Tensor
    model_key: Any
    names: list[str]  # of the training points: file names where the data set has them
    queries: queries.Queries | None = None  # the user's, in place of the pool's samples
    block: int | None = None  # points kept in host memory, moved to the device this many at a time
    half: ScoreModel | None = None  # ``model`` with its network in solver.network_dtype, where set

    @property
    def integrated(self) -> ScoreModel:
        """The model the engine integrates (paths, tangents, the adjoint): ``half`` where
        set; ``model`` itself is what the training-side attributions differentiate."""
        return self.half or self.model

    @property
    def device(self) -> torch.device:
        """Where the model computes (the points are there too unless streamed)."""
        return self.z0.device


def subset_index(n: int, num_train: int | None, seed: int) -> torch.Tensor:
    """Positions of a seeded draw of ``num_train`` of ``n`` training images (all if None)."""
    chosen = draw(n, num_train, seed)
    return torch.arange(n) if chosen is None else chosen


def training_names(cfg: DictConfig, names: list[str] | None, index: torch.Tensor) -> list[str]:
    """The training images' names: their file names where the data set has them, else
    ``<kind>[row]``, their rows in the data set."""
    return names if names is not None else [f"{cfg.dataset.kind}[{i}]" for i in index.tolist()]


def image_source(cfg: DictConfig, run: RunDir) -> Source:
    from diffsens_cli.pipelines.shared.image_stages import ImageStages

    stages = ImageStages(cfg, run.cache)
    rho = stages.rho
    index = subset_index(len(rho), cfg.influence.num_train, int(cfg.seed))
    check_num_train(cfg, len(index))  # before the base model is trained
    require("crossclass" not in cfg or rho.labels is not None, "crossclass",
            f"needs class labels; the data set {cfg.dataset.kind!r} has none")
    require("feature" not in attribution.methods(cfg) or rho.labels is not None, "influence.attributions",
            f"feature needs class labels (its classifier's features); the data set {cfg.dataset.kind!r} has none")
    subset = rho.subset(index)
    model_key, model_dir = stages.base()  # the user's, or trained on rho (or reused from the stage cache)
    model = stages.score_model(model_dir)
    integrated = stages.integration_model((model_key, model_dir))
    names = training_names(cfg, subset.names, index)
    block = training_block(cfg.influence.train_block, subset.images, stages.device, stages.dtype)
    if block is None:
        points = subset.images.to(stages.device, stages.dtype)
    else:  # in host memory (page-locked for a GPU: its copies are faster, and asynchronous)
        points = subset.images.to(stages.dtype)
        points = points.pin_memory() if stages.device.type == "cuda" else points
    return Source(model, points, subset.labels, index, stages.z0(model, int(cfg.influence.pool)),
                  {"model": model_key, "dataset": data_depends(cfg.dataset)}, names, block=block,
                  half=integrated if integrated is not model else None)


# Training images are kept on the device when they take at most this share of its free
# memory (the rest is the integration's); otherwise streamed in blocks of STREAM_SHARE of it.
RESIDENT_SHARE, STREAM_SHARE = 0.25, 0.125


def training_block(spec: Any, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> int | None:
    """``influence.train_block``: how many training images are on the device at a time;
    None: all of them, kept there. ``auto`` keeps them there on a CPU, or on a GPU when they
    take at most ``RESIDENT_SHARE`` of its free memory, and else streams blocks of
    ``STREAM_SHARE`` of it; a whole number streams blocks of that many (when fewer than N)."""
    if spec is None:
        return None
    n, per_image = len(images), images[0].numel() * torch.empty((), dtype=dtype).element_size()
    if spec != "auto":
        block = whole(spec, "influence.train_block", at_least=1)
        return block if block < n else None
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return None if n * per_image <= RESIDENT_SHARE * free else max(1, int(STREAM_SHARE * free) // per_image)


def closed_form_source(cfg: DictConfig) -> Source:
    """N points drawn from the synthetic data set; the model is their exact (empirical) score."""
    comp = Components(cfg)
    n = int(cfg.influence.num_train)
    points = comp.target.sample(n, torch.Generator().manual_seed(int(cfg.seed))).to(comp.device, comp.dtype)
    model = MixtureScore(GaussianMixture.empirical(points), comp.schedule)
    # z0 drawn on the CPU in float64 (the same on every device), then moved
    cpu_model = MixtureScore(GaussianMixture.empirical(points.cpu().double()), comp.schedule)
    t0 = torch.tensor(comp.solver.grid()[0], dtype=torch.float64)
    z0 = cpu_model.sample_base(int(cfg.influence.pool), (points.shape[1],), t0,
                               torch.Generator().manual_seed(int(cfg.seed) + 1)).to(comp.device, comp.dtype)
    key = {"dataset": plain(cfg.dataset), "schedule": plain(cfg.schedule), "num_train": n, "seed": int(cfg.seed)}
    return Source(model, points, None, torch.arange(n), z0, key, [f"point[{i}]" for i in range(n)])


def _extremes(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` largest (largest first) and ``k`` smallest (smallest first)."""
    order = torch.argsort(values, descending=True)
    return order[:k], order.flip(0)[:k]


def residuals(l2: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Influence beyond distance: each score minus its least-squares line on L2 distance
    (per row of [M, N])."""
    slope, intercept, _ = linear_fit(l2, scores)
    return scores.double() - (slope[:, None] * l2.double() + intercept[:, None])


# The images the figures show, per model sample: four blocks of `shown` training images,
# the most and least influential by score, then by residual.
SHOWN_BLOCKS = ("top_score", "bottom_score", "top_residual", "bottom_residual")


def query_groups(cfg: DictConfig, rows: list[int]) -> list[list[int]]:
    """``rows`` in consecutive groups of ``influence.query_batch`` (the exact method: one
    each), the model samples that go through one pass together. The groups depend on the
    sample list only, never on what is cached or on a shard, so every run computes each
    sample in the same group: a sharded run (which splits by group) gives an unsharded
    run's arrays bit for bit."""
    size = 1 if cfg.influence.method == "exact" else whole(cfg.influence.query_batch, "influence.query_batch",
                                                             at_least=1)
    return [rows[k:k + size] for k in range(0, len(rows), size)]


def sample_stages(cfg: DictConfig, run: RunDir, source: Source, groups: list[list[int]], compute: bool = True,
                  desc: str = "influence: model samples") -> dict[int, ArrayDict]:
    """Each model sample's influence stage (``group_stage``) for the groups of
    ``query_groups``, by row of the pool. With ``compute``, a group with a sample not yet
    cached is computed whole and its missing samples stored, each as its own stage (an
    interrupted run keeps the finished groups); else (a sharded run's other jobs' groups)
    each stage is waited for on its lock, and its group computed only if no one has."""
    forced = bool({"influence", "all"} & run.cache.force)
    depends = {i: stage_depends(cfg, source, i) for group in groups for i in group}
    computed: dict[int, dict[int, ArrayDict]] = {}

    def results(g: int) -> dict[int, ArrayDict]:
        if g not in computed:
            computed[g] = group_stage(cfg, source, groups[g])
        return computed[g]

    for g in progress.bar(range(len(groups)) if compute else [], desc=desc, enabled=bool(cfg.solver.progress)):
        for i in [i for i in groups[g] if forced or not run.cache.is_done("influence", depends[i])]:
            run.cache.arrays("influence", depends[i], lambda i=i, g=g: results(g)[i])
        computed.pop(g, None)
    return {i: run.cache.arrays("influence", depends[i], lambda i=i, g=g: results(g)[i])
            for g, group in enumerate(groups) for i in group}


def group_stage(cfg: DictConfig, source: Source, rows: list[int]) -> dict[int, ArrayDict]:
    """The influence of model samples ``rows`` from one pass (their paths, tapes and adjoint
    cotangents side by side; the same as one at a time to round-off, their random numbers
    keyed by row), per row: scores and projections of the sensitivities with the weights
    clamped (``influence.clamp``) and exact (``attribution.clamps``), the top singular
    triples under ``influence.weights``, and the sensitivities psi^n of the images the
    figures show (``SHOWN_BLOCKS``; one forward tangent each, not counted in the cost).
    ``wall_time_s`` is each row's share of the pass, ``network_calls`` the pass's calls."""
    settings = solver_settings(cfg.solver)
    clamps = attribution.clamps(cfg)  # name -> clamp, influence.weights first
    names = list(clamps)
    index = torch.tensor(rows)
    z0 = source.z0[index.to(source.z0.device)]
    start = time.perf_counter()
    res = influence(source.integrated, settings, source.points, z0, influence_settings(cfg), list(clamps.values()),
                    block=source.block, sample_ids=index)
    wall = (time.perf_counter() - start) / len(rows)
    order = [names.index(w) for w in attribution.WEIGHTS]  # stored in WEIGHTS' order
    out = {}
    for b, i in enumerate(rows):
        counts = [res.weights[c].as_dict(b if res.weights[c].per_row else None) for c in order]
        scores = res.scores[:, b]  # [C, N], influence.weights first
        l2 = (source.points.flatten(1).cpu() - res.samples[b].flatten()).norm(dim=1)
        k = min(int(cfg.influence.shown), len(l2))
        shown = torch.cat([*_extremes(scores[0], k), *_extremes(residuals(l2[None], scores[:1])[0], k)])
        unique, where = torch.unique(shown, return_inverse=True)
        psi = Integrator(source.integrated, replace(settings, weight_clamp=clamps[names[0]]),
                         EmpiricalForcing(source.points, index=unique.to(source.points.device), block=source.block))
        shown_psi = psi.run(z0[b:b + 1], first_index=i).psi[:, 0][where]
        out[i] = {
            "sample": res.samples[b].numpy(), "l2": l2.numpy(),
            **{f"scores/{w}": scores[c].numpy() for w, c in zip(attribution.WEIGHTS, order, strict=True)},
            **{f"projections/{w}": res.projections[c, :, b].numpy()
               for w, c in zip(attribution.WEIGHTS, order, strict=True)},
            "singular_values": res.singular_values[b].numpy(), "singular_vectors": res.singular_vectors[b].numpy(),
            "frobenius_sq": res.frobenius_sq[b].numpy(), "exact": np.array(res.exact),
            "shown_index": shown.numpy(), "shown_psi": shown_psi.numpy(),
            "network_calls": np.array(res.network_calls), "network_vectors": np.array(res.network_vectors),
            "wall_time_s": np.array(wall),
            **{f"weights/{key}": np.array([c[key] for c in counts]) for key in counts[0]}}
    return out


def stage_depends(cfg: DictConfig, source: Source, i: int) -> dict[str, Any]:
    """What one model sample's stage depends on: only the influence settings in effect
    (the exact method has no projections; a sketch with m >= d is exact, with m = d)."""
    from diffsens_cli.pipelines.shared.image_stages import solver_depends

    ic = plain(cfg.influence)
    settings = {k: ic[k] for k in ("method", "rank", "shown", "num_train")} | {
        "weights": attribution.weights(cfg), "clamp": attribution.clamp(cfg), "projections_stored": True}
    dim = source.points[0].numel()
    if ic["method"] == "sketch":
        settings["projections"] = min(int(ic["projections"]), dim)
        if settings["projections"] < dim:  # scores refined in the singular directions' span (core.influence.refine)
            settings |= {k: ic[k] for k in ("oversample", "power_iterations")} | {"estimator": "refined"}
    where = {"pool": int(cfg.influence.pool), "sample": i} if source.queries is None else \
        {"z0": content_key(source.z0[i].cpu().numpy()), "sample": i}
    return {"source": source.model_key, "solver": solver_depends(cfg.solver), "influence": settings,
            **where, "seed": int(cfg.seed)}


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    source = closed_form_source(cfg) if closed_form(cfg) else image_source(cfg, run)
    asked = queries.load(cfg, run, source.integrated, source.model_key, source.z0)
    if asked is not None:  # every query is a sample, in place of the pool's
        source = replace(source, z0=asked.z0, queries=asked)
    samples = sample_indices(cfg) if asked is None else list(range(len(asked.z0)))
    shard = Shard.of(cfg)
    groups = shard.mine(query_groups(cfg, samples))  # all of them unless sharded
    todo = [i for group in groups for i in group]
    if shard.partial and not todo:  # more jobs than groups: this one has none
        return finish_partial(run, shard, 0, len(samples))
    stages = sample_stages(cfg, run, source, groups)
    per_sample = [stages[i] for i in todo]
    sets, cost = attribution.score_sets(cfg, run, source, todo, per_sample,
                                        [stage_depends(cfg, source, i) for i in todo])
    if shard.partial:  # the unsharded run assembles
        return finish_partial(run, shard, len(todo), len(samples))
    _report(cfg, run, source, samples, per_sample, sets, cost)


def _report(cfg: DictConfig, run: RunDir, source: Source, samples: list[int], per_sample: list[ArrayDict],
            sets: dict[str, np.ndarray], cost: dict[str, dict[str, float]]) -> None:
    """Arrays, figures and summary from the per-sample stages and the methods' score sets
    (and their ``cost``)."""
    keys = [k for k in per_sample[0] if not k.startswith(("scores/", "projections/"))]
    stack = {k: np.stack([a[k] for a in per_sample]) for k in keys}
    chosen, other = attribution.weights(cfg), next(w for w in attribution.WEIGHTS if w != attribution.weights(cfg))
    by_weights = {w: np.stack([a[f"scores/{w}"] for a in per_sample]) for w in attribution.WEIGHTS}
    l2 = torch.from_numpy(stack["l2"])
    fits = {w: linear_fit(l2, torch.from_numpy(by_weights[w])) for w in attribution.WEIGHTS}
    sv, frob = stack["singular_values"], stack["frobenius_sq"]
    top10 = (sv[:, :10] ** 2).sum(1) / frob
    r2 = {w: fits[w][2].numpy() for w in attribution.WEIGHTS}
    arrays = {"influence/scores": sets["ours"], "influence/l2": stack["l2"],
              "z0": source.z0[samples].cpu().numpy(),
              "samples": stack["sample"], "train_index": source.train_index.numpy(),
              "influence/singular_values": sv, "influence/singular_vectors": stack["singular_vectors"],
              "influence/frobenius_sq": frob, "influence/shown_index": stack["shown_index"],
              "influence/shown_psi": stack["shown_psi"], "sample_index": np.array(samples),
              **{f"influence/{name}/scores": values for name, values in sets.items() if name != "ours"}}
    if closed_form(cfg):
        arrays["train_points"] = source.points.cpu().numpy()
    asked = _queries_report(source.queries, arrays)
    diagnosis = attribution.clamp_diagnosis(per_sample, source.points)
    figures = _figures(cfg, run, source, stack, by_weights[chosen], fits[chosen], by_weights[other], (chosen, other))
    figures += run.save_figure(plots.clamp_diagnosis(diagnosis, attribution.WEIGHTS), "fig_clamp_diagnosis")
    if source.points.ndim == 4:
        tops = {name: np.argsort(-values, axis=1, kind="stable")[:, :10] for name, values in sets.items()
                if name != "ours"}
        if "ours_loss" in sets:  # signed: its opponents too, the images whose removal would lower the loss
            tops["ours_loss opponents"] = np.argsort(sets["ours_loss"], axis=1, kind="stable")[:, :10]
        figures += run.save_figure(plots.attribution_tops(stack["sample"], source.points.cpu().numpy(), tops),
                                   "fig_attribution_top10")
    crossclass = _crossclass(cfg, run, source, stack, sets["ours"], arrays) if "crossclass" in cfg else None
    tables = _tables(run, source, samples, sets)
    galleries = _galleries(run, source, samples, sets["ours"], stack["sample"], int(cfg.influence.shown)) \
        if source.points.ndim == 4 else []
    run.save_arrays("arrays", arrays)
    ic = cfg.influence
    metrics = {
        "influence": {
            "weights_used": chosen, "clamp": list(attribution.clamp(cfg)),
            "r2_l2": {"per_sample": r2[chosen].tolist(), "median": float(np.median(r2[chosen]))},
            **{f"r2_l2_{w}": {"per_sample": r2[w].tolist(), "median": float(np.median(r2[w]))}
               for w in attribution.WEIGHTS},
            "top10_variance": {"per_sample": top10.tolist(), "median": float(np.median(top10))},
            "clamp_diagnosis": diagnosis,
            "methods": {name: row | {"cost": cost[name]} for name, row in attribution.comparisons(sets).items()},
            **({"ours_loss": attribution.signed_summary(sets["ours_loss"])} if "ours_loss" in sets else {}),
            "method": str(ic.method), "exact": bool(stack["exact"].all()),
            "settings": {k: plain(ic[k]) for k in ("projections", "rank", "oversample", "power_iterations")},
            "num_train": len(source.points), "num_samples": len(samples),
            "memory": _memory(source),
            "network_calls_per_sample": float(stack["network_calls"].mean()),
            "network_vectors_per_sample": float(stack["network_vectors"].mean()),
            "wall_time_s_per_sample": float(stack["wall_time_s"].mean()),
            "weights": {w: {k.removeprefix("weights/"): int(stack[k][:, c].sum())
                            for k in stack if k.startswith("weights/")}
                        for c, w in enumerate(attribution.WEIGHTS)},
        },
        "paper": plain(ic.paper),
        **({"queries": asked} if asked else {}),
        "tables": tables,
    }
    if crossclass is not None:
        metrics["crossclass"], more = crossclass
        figures += more
    run.write_summary(metrics, figures=figures, galleries=galleries, solver=plain(cfg.solver))
    low = diagnosis["clamped"]["share_clamped_low"]["median"]
    print(f"influence of {len(source.points)} training points on {len(samples)} samples ({ic.method}, "
          f"ours = {chosen}): median r2 vs L2 {np.median(r2['clamped']):.3f} clamped, {np.median(r2['exact']):.3f} "
          f"exact; {low:.0%} of the weights on the clamp's floor; affine R^2 "
          f"{diagnosis['clamped']['affine_r2']['median']:.2f} clamped, {diagnosis['exact']['affine_r2']['median']:.2f} "
          f"exact; top-10 variance {np.median(top10):.3f}; {stack['network_calls'].mean():.0f} network calls "
          "per sample")


def _memory(source: Source) -> dict[str, Any]:
    """What the training images take and where they were (``influence.train_block``), and
    the device's peak memory in this process (on a GPU)."""
    peak = torch.cuda.max_memory_allocated(source.device) if source.device.type == "cuda" else None
    return {"training_images_gb": source.points.nbytes / 1e9, "streamed_block": source.block,
            "device_peak_gb": None if peak is None else peak / 1e9}


def _label(source: Source, sample: int) -> str:
    """A model sample's (or the user's query's) name in the files of a run."""
    return f"query_{sample}" if source.queries is not None else f"sample_{sample}"


# The model samples (or queries) whose most and least influential training images the
# run's index.html shows; every sample's are in its table.
GALLERY_SAMPLES = 16


def _galleries(run: RunDir, source: Source, samples: list[int], scores: np.ndarray, images: np.ndarray,
               k: int) -> list[dict[str, Any]]:
    """Per model sample (the first ``GALLERY_SAMPLES``): its image and the ``k`` training
    images most and least influential on it by ``ours`` (``scores`` [M, N]), as thumbnails
    under ``gallery/<sample>/`` with their names and scores; the summary's ``galleries``,
    which the run's index.html shows."""
    train = source.points.cpu().numpy()
    asked = source.queries.names if source.queries is not None and source.queries.names else None
    out = []
    for row, sample in enumerate(samples[:GALLERY_SAMPLES]):
        label = _label(source, sample)

        def shown(which: str, index: torch.Tensor, row: int = row, label: str = label) -> list[dict[str, Any]]:
            return [{"image": run.save_image(f"gallery/{label}/{which}_{r + 1}", train[n]), "name": source.names[n],
                     "score": float(scores[row, n])} for r, n in enumerate(index.tolist())]

        top, bottom = _extremes(torch.from_numpy(scores[row]), min(k, scores.shape[1]))
        title = f"{label}: {asked[sample]}" if asked else label
        out.append({"title": title, "image": run.save_image(f"gallery/{label}/sample", images[row]),
                    "top": shown("top", top), "bottom": shown("bottom", bottom)})
    return out


def _tables(run: RunDir, source: Source, samples: list[int], sets: dict[str, np.ndarray]) -> list[str]:
    """Per model sample, ``tables/<sample>.csv``: every training image, most influential
    first by ``ours``, with its rank, its row in the data set, its name and each method's
    score; the paths written."""
    methods = ["ours"] + [name for name in sets if name != "ours"]
    header = ["rank", "train_index", "name", *(f"score_{m}" for m in methods)]
    rows_of, names = source.train_index.numpy(), np.array(source.names)
    written = []
    for row, sample in enumerate(samples):
        order = np.argsort(-sets["ours"][row], kind="stable")
        columns = [range(1, len(order) + 1), rows_of[order].tolist(), names[order].tolist(),
                   *(sets[m][row, order].tolist() for m in methods)]  # column-wise: N may be 10^5
        written.append(run.save_table(f"tables/{_label(source, sample)}", header, list(zip(*columns, strict=True))))
    return written


def _queries_report(asked: queries.Queries | None, arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """The user's queries in the arrays (their images and reconstructions) and what the
    summary says of them: how many, their names, how well each was reproduced."""
    if asked is None:
        return None
    error = asked.relative_error()
    if error is None:
        return {"count": len(asked.z0), "given": "z0"}
    arrays |= {"queries/images": asked.images.numpy(), "queries/reconstructed": asked.reconstructed.numpy(),
               "queries/relative_error": error}
    return {"count": len(asked.z0), "given": "images", "names": asked.names,
            "reconstruction_relative_error": {"per_query": error.tolist(), "median": float(np.median(error)),
                                              "max": float(error.max())}}


def _crossclass(cfg: DictConfig, run: RunDir, source: Source, stack: dict[str, np.ndarray], scores: np.ndarray,
                arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], list[str]]:
    """Paper Fig. 11 from the scores: the class-by-class mean influence and its diagonal
    dominance (its arrays added to ``arrays``)."""
    labels, cc = source.labels.numpy(), cfg.crossclass
    sample_classes, accuracy = crossclass.classify(source.points.cpu().numpy(), labels, stack["sample"],
                                                   float(cc.held_out), int(cfg.seed), str(cc.classifier),
                                                   int(cc.epochs), bool(cc.flip), source.device)
    classes = np.unique(labels)
    matrix = crossclass.crossclass_matrix(scores, sample_classes, labels, classes)
    arrays |= {"crossclass/matrix": matrix, "crossclass/sample_classes": sample_classes, "crossclass/classes": classes}
    dominance = crossclass.diagonal_dominance(matrix)
    figure = run.save_figure(plots.crossclass_heatmap(matrix, [str(c) for c in classes],
                                                      f"diagonal dominance {dominance:.2f}"), "fig11_crossclass")
    counts = {str(c): int((sample_classes == c).sum()) for c in classes}
    return {"diagonal_dominance": dominance, "classifier_heldout_accuracy": accuracy,
            "samples_per_class": counts, "classifier": crossclass.CLASSIFIERS[str(cc.classifier)]}, figure


def _figures(cfg: DictConfig, run: RunDir, source: Source, stack: dict[str, np.ndarray], scores: np.ndarray,
             fits, other_scores: np.ndarray, labels: tuple[str, str]) -> list[str]:
    """Paper Figs. 8-10, 12-14 for the scores of ``influence.weights`` (``scores`` [M, N],
    their lines on distance ``fits``); Fig. 9 shows the other weights' scores too."""
    images = source.points.ndim == 4
    slope, intercept, r2 = (f.numpy() for f in fits)
    figures = run.save_figure(plots.influence_regression(  # paper Fig. 9's statistic
        stack["l2"], scores, list(zip(slope, intercept, r2, strict=True)), other_scores, labels),
        "fig9_residual_influence")
    amplitudes = np.asarray(OmegaConf.to_container(cfg.influence.ray_amplitudes), dtype=float)
    figures += run.save_figure(plots.singular_rays(stack["sample"], stack["singular_values"], stack["frobenius_sq"],
                                                   stack["singular_vectors"] if images else None, amplitudes),
                               "fig10_singular_rays")
    if not images:
        return figures
    k = stack["shown_index"].shape[1] // len(SHOWN_BLOCKS)
    train = source.points.cpu().numpy()
    residual = residuals(torch.from_numpy(stack["l2"]), torch.from_numpy(scores)).numpy()
    for name, part, label in (("fig8_most_least_influential", 0, "influential"),  # Figs. 8 and 12
                              ("fig13_residual_extremes", 1, "residual influence")):  # Figs. 9 and 13
        rows = []
        for m in range(len(stack["sample"])):
            idx, psi = stack["shown_index"][m], stack["shown_psi"][m]
            top, bottom = slice(2 * k * part, 2 * k * part + k), slice(2 * k * part + k, 2 * k * (part + 1))
            values = scores[m] if part == 0 else residual[m]
            rows.append({"top": idx[top], "bottom": idx[bottom], "top_psi": psi[top], "bottom_psi": psi[bottom],
                         "top_values": values[idx[top]], "bottom_values": values[idx[bottom]]})
        figures += run.save_figure(plots.influence_extremes(stack["sample"], train, rows,
                                                            top_label=f"most {label}", bottom_label=f"least {label}"),
                                   name)
    figures += run.save_figure(plots.singular_vectors(stack["sample"], stack["singular_vectors"]),
                               "fig14_singular_vectors")
    return figures
