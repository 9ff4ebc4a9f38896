"""Influence benchmark: what the ``exact`` and ``sketch`` methods cost for one model sample
as the number N of training images grows, and how close the sketch comes to exact as
the number m of projections grows.

Both methods run side by side in one process on the experiment's trained base model
(its stage is reused), for seeded subsets of N training images (``bench.sizes``):
wall time, network calls and the vectors (tangents, probes, cotangents) they carry.
Then, at ``bench.accuracy_size`` images, the sketch for each m in
``bench.projections`` against exact: the Spearman rank correlation of the scores, the
overlap of the top-10 training images, and the relative error of the top singular
values.  Timings are not cached: the benchmark reruns on purpose.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.builders import solver_settings
from diffsens_cli.core.compare import spearman
from diffsens_cli.core.influence import InfluenceResult, influence
from diffsens_cli.errors import listed, require, whole
from diffsens_cli.pipelines import influence as task
from diffsens_cli.plots import influence as plots
from diffsens_cli.rundir import RunDir

STAGES = ("train_base", "network_dtype_check")
TOP = 10  # the top-k overlap and singular values compared


def _sizes(cfg: DictConfig, key: str) -> list[int]:
    values = listed(cfg.bench[key], f"bench.{key}", whole)
    require(min(values) >= 1, f"bench.{key}", f"must list counts >= 1, got {values}")
    return values


def check(cfg: DictConfig) -> None:
    task.check(cfg)
    require(not task.closed_form(cfg), "model.kind", "the influence benchmark times a trained image model")
    _sizes(cfg, "sizes")
    _sizes(cfg, "projections")
    n = whole(cfg.bench.accuracy_size, "bench.accuracy_size")
    require(n >= TOP, "bench.accuracy_size", f"must be >= {TOP}, got {n}")
    i = whole(cfg.bench.sample, "bench.sample")
    pool = int(cfg.influence.pool)
    require(0 <= i < pool, "bench.sample", f"must be a row of the pool (0..{pool - 1}), got {i}")


def compare(sketch: InfluenceResult, exact: InfluenceResult) -> dict[str, float]:
    """The sketch's scores and singular values against exact (one model sample); the
    singular values compared are as many as both have (fewer projections than
    ``rank + oversample`` keep fewer)."""
    s, e = sketch.scores[0, 0].numpy(), exact.scores[0, 0].numpy()
    top = min(TOP, len(e))
    overlap = len(set(np.argsort(-s)[:top]) & set(np.argsort(-e)[:top])) / top
    k = min(TOP, sketch.singular_values.shape[1], exact.singular_values.shape[1])
    sv_err = (sketch.singular_values[0, :k] - exact.singular_values[0, :k]).abs() / exact.singular_values[0, :k]
    positive = e > 0  # a score is 0 where every weight underflowed
    return {"spearman": float(spearman(torch.from_numpy(s), torch.from_numpy(e))), "top10_overlap": overlap,
            "max_rel_error_top_singular_values": float(sv_err.max()), "singular_values_compared": k,
            "median_rel_error_scores": float(np.median(np.abs(s - e)[positive] / e[positive]))}


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    source = task.image_source(cfg, run)
    solver = solver_settings(cfg.solver)
    clamps = [solver.weight_clamp]
    base = task.influence_settings(cfg)
    sample = int(cfg.bench.sample)
    z0 = source.z0[sample:sample + 1]
    accuracy_size = int(cfg.bench.accuracy_size)

    def timed(points: torch.Tensor, **changes: Any) -> tuple[InfluenceResult, dict[str, float]]:
        start = time.perf_counter()
        res = influence(source.integrated, solver, points, z0, replace(base, **changes), clamps, first_index=sample,
                        block=source.block)
        if z0.device.type == "cuda":
            torch.cuda.synchronize(z0.device)
        return res, {"wall_time_s": time.perf_counter() - start, "network_calls": res.network_calls,
                     "network_vectors": res.network_vectors}

    def subset(n: int) -> torch.Tensor:
        return source.points[task.subset_index(len(source.points), n, int(cfg.seed)).to(source.points.device)]

    sizes, speedup, exact_at = {}, {}, {}
    for n in _sizes(cfg, "sizes"):
        points = subset(n)
        exact, sizes[f"exact/{len(points)}"] = timed(points, method="exact")
        _, sizes[f"sketch/{len(points)}"] = timed(points, method="sketch")
        speedup[str(len(points))] = sizes[f"exact/{len(points)}"]["wall_time_s"] / \
            sizes[f"sketch/{len(points)}"]["wall_time_s"]
        exact_at[len(points)] = exact
        print(f"N = {len(points)}: exact {sizes[f'exact/{len(points)}']['wall_time_s']:.1f} s, "
              f"sketch {sizes[f'sketch/{len(points)}']['wall_time_s']:.1f} s, speedup {speedup[str(len(points))]:.1f}")
    points = subset(accuracy_size)
    reference = exact_at.get(len(points)) or timed(points, method="exact")[0]
    accuracy = {}
    for m in _sizes(cfg, "projections"):
        res, cost = timed(points, method="sketch", projections=m)
        accuracy[str(m)] = compare(res, reference) | cost
        print(f"m = {m}: Spearman {accuracy[str(m)]['spearman']:.3f}, top-10 overlap "
              f"{accuracy[str(m)]['top10_overlap']:.1f}")
    run.save_arrays("arrays", {
        "sizes": np.array([int(k) for k in speedup]), "speedup": np.array(list(speedup.values())),
        "projections": np.array([int(k) for k in accuracy]),
        "spearman": np.array([a["spearman"] for a in accuracy.values()]),
        "reference_scores": reference.scores[0, 0].numpy(),
    })
    figures = run.save_figure(plots.influence_cost(sizes, accuracy), "bench_influence")
    run.write_summary({"speedup_sketch_vs_exact": speedup, "runs": sizes, "accuracy_vs_projections": accuracy},
                      figures=figures, sample=sample, accuracy_size=len(points),
                      device=str(z0.device), dtype=str(z0.dtype), network_dtype=cfg.solver.network_dtype,
                      settings={"rank": base.rank, "oversample": base.oversample,
                                "power_iterations": base.power_iterations, "projections": base.projections})
