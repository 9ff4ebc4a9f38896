"""What the paper-sized experiments would cost here, before a GPU is booked.

Times the networks of the paper's experiments (App. F.2's CelebA and MNIST UNets, the
DDPM CIFAR-10 UNet a user brings, and the embedded digits' UNet as a check), freshly
initialised on synthetic inputs of the right shapes (their cost does not depend on
their weights): one score evaluation, one JVP with K tangents (``score_with_derivatives``,
what a sensitivity step calls), one VJP with m cotangents (``score_and_vjp``, what an
adjoint step calls) and one training step (the trainer's own), with the peak memory of
each.  Costs are per batch item at ``bench.networks.<name>.batch`` (a CPU measures a
small batch; its time grows linearly with the batch), and linear in K and m between the
counts measured (``bench.tangents``, ``bench.cotangents``: least squares).

Each experiment of ``bench.experiments`` is composed from its own config, and its work
is counted from it (``workload``): training steps of each model, score evaluations of
each sampling, JVPs with their tangent counts, VJPs with their cotangent counts; the
predicted wall time is the sum of count x per-item cost.  Left out: data loading, OT,
classifiers, attribution baselines and plotting (seconds to minutes where the network
work is hours).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import build_schedule, device_and_dtype, solver_settings
from diffsens_cli.errors import listed, plain, positive_whole, require, whole
from diffsens_cli.pipelines.shared.timing import median_seconds, peak_memory
from diffsens_cli.rundir import RunDir

OPS = ("eval", "jvp", "vjp", "train")


@dataclass(frozen=True)
class Work:
    """``items`` batch items of one operation (``op``: eval, jvp with ``k`` tangents, vjp with
    ``k`` cotangents, or train: one item of a training batch) for one stage of an experiment."""

    stage: str
    op: str
    items: int
    k: int = 0


# -- measuring -------------------------------------------------------------------------
def linear_fit(counts: list[int], seconds: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``seconds ~ a + b k`` by least squares (``b`` alone from one count)."""
    if len(counts) == 1:
        return 0.0, seconds[0] / counts[0]
    b, a = np.polyfit(np.asarray(counts, float), np.asarray(seconds, float), 1)
    return float(a), float(b)


def measure_network(spec: dict[str, Any], schedule, device: torch.device, dtype: torch.dtype, repeats: int,
                    tangents: list[int], cotangents: list[int], seed: int) -> dict[str, Any]:
    """Per-item seconds and peak bytes of each operation of one network at its batch."""
    from diffsens_cli.core.measures import GaussianMixture
    from diffsens_cli.models.unet import build_network_model
    from diffsens_cli.training.settings import TrainSettings
    from diffsens_cli.training.trainer import Trainer

    shape, batch = spec["shape"], spec["batch"]
    model = build_network_model(spec["model"], shape, schedule, dtype=dtype)
    model.net.to(device).eval()
    gen = torch.Generator(device).manual_seed(seed)
    z = torch.randn(batch, *shape, generator=gen, device=device, dtype=dtype)
    t = torch.tensor(0.5, device=device, dtype=dtype)
    most = max(*tangents, *cotangents)
    v = torch.randn(most, batch, *shape, generator=gen, device=device, dtype=dtype)

    calls: dict[str, Callable[[], object]] = {"eval": lambda: model.score(z, t)}
    calls |= {f"jvp{k}": (lambda k=k: model.score_with_derivatives(z, t, v[:k])) for k in tangents}
    calls |= {f"vjp{k}": (lambda k=k: model.score_and_vjp(z, t, v[:k])) for k in cotangents}
    with torch.no_grad():  # score_and_vjp turns on the gradients it needs
        seconds = {name: median_seconds(device, fn, repeats) for name, fn in calls.items()}
        memory = {name: peak_memory(device, fn) for name, fn in calls.items()}

    train_model = build_network_model(spec["model"], shape, schedule, dtype=dtype, forward_ad=False)
    train_model.net.train()
    data = GaussianMixture.empirical(torch.rand(max(batch, 16), *shape, generator=gen, device=device,
                                                dtype=dtype) * 2 - 1)
    settings = TrainSettings(steps=repeats + 1, batch_size=batch, lr=1e-4, lr_scheduler="constant",
                             lr_warmup_steps=0, weight_decay=0.01, ema_decay=None, hflip=False, t_min=1e-3,
                             grad_clip=1.0, checkpoint_every=10**9, keep_checkpoints=1, seed=seed, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(train_model, data, tuple(shape), settings, Path(tmp), cpu=device.type == "cpu")
        seconds["train"] = median_seconds(device, trainer.train_step, repeats)
        memory["train"] = peak_memory(device, trainer.train_step)
    per_item = {name: s / batch for name, s in seconds.items()}
    jvp = linear_fit(tangents, [per_item[f"jvp{k}"] for k in tangents])
    vjp = linear_fit(cotangents, [per_item[f"vjp{k}"] for k in cotangents])
    return {"batch": batch, "shape": list(shape), "parameters": sum(p.numel() for p in model.net.parameters()),
            "seconds_per_item": per_item, "peak_bytes": memory,
            "jvp_fit": {"a": jvp[0], "b": jvp[1]}, "vjp_fit": {"a": vjp[0], "b": vjp[1]}}


def item_seconds(measured: dict[str, Any], op: str, k: int) -> float:
    """Per-item seconds of ``op`` with ``k`` tangents or cotangents, from ``measure_network``."""
    if op in ("eval", "train"):
        return measured["seconds_per_item"][op]
    fit = measured[f"{op}_fit"]
    return fit["a"] + fit["b"] * k


# -- what each experiment does --------------------------------------------------------
def _evaluations(solver: DictConfig, dim: int) -> tuple[int, int]:
    """Score evaluations per path, and the density's tangents each carries: the Hutchinson
    probes, or ``dim`` basis vectors for the exact trace (0 without CCoV)."""
    s = solver_settings(solver)
    probes = 0 if s.density != "ccov" else s.hutchinson_samples if s.divergence == "hutchinson" else dim
    return s.evaluations(), probes


def _train_items(train: DictConfig, epoch_size: int) -> int:
    """Batch items a training with ``train`` passes (steps x batch)."""
    from diffsens_cli.training.settings import train_settings

    s = train_settings(train, epoch_size)
    return s.steps * s.batch_size


def dataset_size(cfg_dataset: DictConfig, sizes: dict[str, int]) -> int:
    """Images a data set config loads: its ``num_images`` (rendered sets), else the data set's
    size (``bench.dataset_sizes``), at most its ``limit``."""
    kind = str(cfg_dataset.kind)
    n = cfg_dataset.get("num_images")
    if n is None:
        require(kind in sizes, "bench.dataset_sizes", f"has no size for the data set {kind!r}")
        n = sizes[kind]
    limit = cfg_dataset.get("limit")
    return min(int(limit), int(n)) if limit is not None else int(n)


def _influence_work(cfg: DictConfig, samples: int, n_train: int, dim: int) -> list[Work]:
    """The influence sketch of ``samples`` model samples (``core.influence.influence``)."""
    require(cfg.influence.method == "sketch", "influence.method", "only the sketch's work is counted here")
    evals, h = _evaluations(cfg.solver, dim)
    ic = cfg.influence
    m = min(int(ic.projections), dim)
    rank = min(int(ic.rank), n_train, dim)
    paths = samples * evals
    work = [Work("influence: path and tape", "jvp", paths, h),
            Work(f"influence: adjoint, {m} projections", "vjp", paths, m)]
    if m < dim:
        width = max(1, min(rank + int(ic.oversample), m // 2))
        power = int(ic.power_iterations)
        work += [Work("influence: randomised SVD, forward", "jvp", (power + 1) * paths, width + h),
                 Work("influence: randomised SVD, adjoint", "vjp", power * paths, width),
                 Work("influence: singular directions", "vjp", paths, min(rank, width))]
    work.append(Work("influence: shown images' psi", "jvp", paths, min(4 * int(ic.shown), n_train) + h))
    return work


def workload(cfg: DictConfig, sizes: dict[str, int], dim: int) -> list[Work]:
    """The network work of one experiment, counted from its composed config ``cfg``, for
    images of ``dim`` coordinates and data sets of ``sizes`` images."""
    from diffsens_cli.pipelines.shared.image_stages import finetune_config

    task = str(cfg.task)
    n_rho = dataset_size(cfg.dataset, sizes)
    base = [] if cfg.model.kind == "pretrained" else [Work("train_base", "train", _train_items(cfg.train, n_rho))]
    evals, h = _evaluations(cfg.solver, dim)
    if task == "predict_change":
        n_s = dataset_size(cfg.perturbation.source, sizes)
        if cfg.perturbation.get("num_samples") is not None:
            n_s = min(n_s, int(cfg.perturbation.num_samples))
        n = int(cfg.predict.num_samples)
        trains = {"retrain": _train_items(OmegaConf.merge(cfg.train, {"mode": "retrain"}), n_rho),
                  "finetune": _train_items(finetune_config(cfg), n_s)}
        return [*base, Work("sensitivity", "jvp", n * evals, 1 + h),
                *(w for mode in cfg.predict.modes for w in (Work(f"train_{mode}", "train", trains[mode]),
                                                            Work(f"samples_{mode}", "eval", n * evals)))]
    from diffsens_cli.pipelines import influence

    samples = len(influence.sample_indices(cfg))
    if task == "influence":
        return [*base, *_influence_work(cfg, samples, n_rho, dim)]
    require(task == "counterfactual", "bench.experiments", f"no workload is known for the task {task!r}")
    from diffsens_cli.core.counterfactual import PREDICTIONS
    from diffsens_cli.pipelines import counterfactual

    queries = counterfactual.removal_queries(cfg)
    removals = len(counterfactual.removal_columns(cfg)) * len(counterfactual.removal_sizes(cfg, n_rho))
    subsets = int(cfg.datamodel.subsets)
    # the full data, each removal set (equal sets train once: an upper bound), each subset, the noise floor
    trainings = 1 + queries * removals + subsets + int(cfg.counterfactual.floor_seeds)
    # each removal set's prediction under every weighting of PREDICTIONS, one tangent each
    forcings = [len(PREDICTIONS) * (removals + subsets if m < queries else subsets) for m in range(samples)]
    # its full-data model is the retraining that removes nothing: no train_base
    return [*_influence_work(cfg, samples, n_rho, dim),
            Work(f"train_counterfactual: {trainings} trainings", "train", trainings * _train_items(cfg.train, n_rho)),
            Work("samples_counterfactual", "eval", trainings * samples * evals),
            *(Work("predictions_counterfactual", "jvp", evals, k + h) for k in forcings)]


def predict(work: list[Work], measured: dict[str, Any]) -> dict[str, float]:
    """Predicted seconds per stage (stages of the same name summed)."""
    out: dict[str, float] = {}
    for w in work:
        out[w.stage] = out.get(w.stage, 0.0) + w.items * item_seconds(measured, w.op, w.k)
    return out


# -- the run --------------------------------------------------------------------------
def compose_experiment(name: str) -> DictConfig:
    """The full config of ``experiment=name``, as ``diffsens run`` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from diffsens_cli.sweeps import CONFIG_MODULE

    overrides = [f"experiment={name}"]
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=overrides)


def _networks(cfg: DictConfig, device: torch.device) -> dict[str, dict[str, Any]]:
    """``bench.networks``: name -> model config, image shape and the batch measured on ``device``."""
    from diffsens_cli.models.unet import bench_network

    out = {}
    for name, spec in (plain(cfg.bench.networks) or {}).items():
        key = f"bench.networks.{name}"
        model, shape = bench_network(spec, key, ("batch",))
        batch = spec["batch"]
        kind = "cuda" if device.type == "cuda" else "cpu"
        require(isinstance(batch, dict) and kind in batch, f"{key}.batch", f"needs a {kind} batch, got {batch!r}")
        out[name] = {"model": model, "shape": shape, "batch": positive_whole(batch[kind], f"{key}.batch.{kind}")}
    return out


def _experiments(cfg: DictConfig, networks: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``bench.experiments``: experiment name -> the network of ``bench.networks`` it runs."""
    out = plain(cfg.bench.experiments) or {}
    require(isinstance(out, dict) and out, "bench.experiments", f"must map experiments to networks, got {out!r}")
    for name, network in out.items():
        require(network in networks, f"bench.experiments.{name}",
                f"must name one of bench.networks ({', '.join(networks)}), got {network!r}")
    return out


def check(cfg: DictConfig) -> None:
    device, _ = device_and_dtype(cfg.solver)
    positive_whole(cfg.bench.repeats, "bench.repeats")
    for field in ("tangents", "cotangents"):
        counts = listed(cfg.bench[field], f"bench.{field}", whole)
        require(counts and min(counts) >= 1 and len(set(counts)) == len(counts), f"bench.{field}",
                f"must list distinct counts >= 1, got {counts}")
    sizes = plain(cfg.bench.dataset_sizes)
    require(isinstance(sizes, dict) and all(isinstance(v, int) and v >= 1 for v in sizes.values()),
            "bench.dataset_sizes", f"must map data set kinds to image counts, got {sizes!r}")
    _experiments(cfg, _networks(cfg, device))


def run(cfg: DictConfig, run: RunDir) -> None:
    from diffsens_cli.plots.synthetic import text_table

    check(cfg)
    device, dtype = device_and_dtype(cfg.solver)
    bc = cfg.bench
    networks = _networks(cfg, device)
    experiments = _experiments(cfg, networks)
    sizes = plain(bc.dataset_sizes)
    tangents = listed(bc.tangents, "bench.tangents", whole)
    cotangents = listed(bc.cotangents, "bench.cotangents", whole)
    schedule = build_schedule(cfg.schedule)
    measured = {}
    for name in dict.fromkeys(experiments.values()):
        measured[name] = measure_network(networks[name], schedule, device, dtype, int(bc.repeats), tangents,
                                         cotangents, int(cfg.seed))
        print(f"bench_paper_scale: {name} measured ({measured[name]['parameters'] / 1e6:.1f}M parameters)", flush=True)
    predictions = {}
    for experiment, network in experiments.items():
        work = workload(compose_experiment(experiment), sizes, int(np.prod(networks[network]["shape"])))
        stages = predict(work, measured[network])
        predictions[experiment] = {"network": network, "hours": sum(stages.values()) / 3600,
                                   "stage_hours": {k: v / 3600 for k, v in stages.items()},
                                   "work": [w.__dict__ for w in work]}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    rows = list(predictions)
    largest = {e: max(p["stage_hours"], key=p["stage_hours"].get) for e, p in predictions.items()}
    cells = [[p["network"], _duration(p["hours"] * 3600),
              f"{_duration(p['stage_hours'][largest[e]] * 3600)} ({largest[e]})"] for e, p in predictions.items()]
    figures = run.save_figure(text_table(rows, ["network", "predicted wall time", "largest stage"], cells,
                                         f"Predicted wall time on {where} ({dtype})", verdict=False),
                              "predicted_wall_time")
    run.save_arrays("arrays", {
        **{f"{name}/seconds_per_item/{op}": np.array(v) for name, m in measured.items()
           for op, v in m["seconds_per_item"].items()},
        **{f"{experiment}/predicted_hours": np.array(p["hours"]) for experiment, p in predictions.items()}})
    run.write_summary({"predictions": predictions, "networks": measured}, figures=figures, device=where,
                      dtype=str(dtype), repeats=int(bc.repeats))
    for experiment, p in predictions.items():
        print(f"{experiment:>22}: {_duration(p['hours'] * 3600):>10} on {where} ({p['network']} network)")


def _duration(seconds: float) -> str:
    """``seconds`` as the largest sensible unit (s, min, h, days)."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
