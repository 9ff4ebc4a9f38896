"""Training speed, old path against new, side by side in one process.

Trains the experiment's network (by default the main job's digits UNet on rho) from the
same initial weights and the same batches under each of ``bench.variants`` (overrides of
the ``train`` group: ``fused``, ``mixed_precision``), ``bench.steps`` steps each, the
variants interleaved and repeated ``bench.repeats`` times; reports the median steps per
second and seconds per epoch of each, its speed-up over ``bench.reference``, and how far
its loss curve and final weights are from the reference's (what the variant changes
about the training itself).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import build_schedule, device_and_dtype
from diffsens_cli.errors import plain, positive_whole, require
from diffsens_cli.pipelines.shared.timing import median_seconds
from diffsens_cli.rundir import RunDir

MATMUL_SIDE = 2048  # the matmul whose rate a compute-bound step is compared with


def _variants(cfg: DictConfig) -> dict[str, DictConfig]:
    """``bench.variants``: name -> the ``train`` group with that variant's overrides."""
    from diffsens_cli.training.settings import train_settings

    variants = plain(cfg.bench.variants)
    require(isinstance(variants, dict) and len(variants) >= 2, "bench.variants",
            f"must map at least two names to train overrides, got {variants!r}")
    out = {}
    for name, overrides in variants.items():
        require(isinstance(overrides, dict), f"bench.variants.{name}", f"must be train overrides, got {overrides!r}")
        for key in overrides:
            require(key in cfg.train, f"bench.variants.{name}.{key}", f"no such key; train has: {', '.join(cfg.train)}")
        out[name] = OmegaConf.merge(cfg.train, overrides)
        train_settings(out[name], 1)
    require(cfg.bench.reference in out, "bench.reference",
            f"must name one of bench.variants, got {cfg.bench.reference!r}")
    return out


def check(cfg: DictConfig) -> None:
    from diffsens_cli.pipelines.shared.image_stages import check_data_and_model

    check_data_and_model(cfg, with_s=False)
    positive_whole(cfg.bench.steps, "bench.steps")
    positive_whole(cfg.bench.repeats, "bench.repeats")
    _variants(cfg)


def run(cfg: DictConfig, run: RunDir) -> None:
    from diffsens_cli.models.unet import build_network_model
    from diffsens_cli.plots.synthetic import text_table
    from diffsens_cli.training.settings import train_settings
    from diffsens_cli.training.source import training_source
    from diffsens_cli.training.trainer import Trainer

    check(cfg)
    device, dtype = device_and_dtype(cfg.solver)
    variants = _variants(cfg)
    steps, repeats, reference = int(cfg.bench.steps), int(cfg.bench.repeats), str(cfg.bench.reference)
    source, shape, epoch_size, _ = training_source(OmegaConf.merge(cfg, {"train": {"mode": "base"}}))
    schedule = build_schedule(cfg.schedule)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, np.ndarray] = {}
    weights: dict[str, torch.Tensor] = {}
    batch = train_settings(cfg.train, epoch_size).batch_size

    def train(variant: DictConfig, num_steps: int) -> tuple[float, Trainer]:
        """Seconds ``num_steps`` steps of ``variant`` take from fresh weights, and the trainer."""
        settings = train_settings(OmegaConf.merge(variant, {"steps": num_steps, "progress": False,
                                                            "checkpoint_every": 10**9}), None)
        model = build_network_model(cfg.model, shape, schedule, dtype=dtype, forward_ad=False)
        model.net.train()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(model, source, shape, settings, Path(tmp), cpu=device.type == "cpu")
            start = time.perf_counter()
            trainer.train()
            return time.perf_counter() - start, trainer

    for variant in variants.values():  # warm-up: first calls choose kernels and allocate
        train(variant, 2)
    flops = step_flops(train(variants[reference], 1)[1])
    peak = matmul_flops_per_second(device, dtype)
    for repeat in range(repeats):
        for name, variant in variants.items():
            wall, trainer = train(variant, steps)
            seconds[name].append(wall)
            if repeat == 0:
                losses[name] = np.asarray(trainer.losses)
                weights[name] = torch.cat([p.detach().flatten().double().cpu()  # the EMA's, where kept
                                           for p in trainer.sampling_model().net.parameters()])
        print(f"bench_train: repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{name} {steps / s[-1]:.2f} steps/s" for name, s in seconds.items()), flush=True)
    steps_per_epoch = epoch_size / batch
    ref_loss, ref_weights = losses[reference], weights[reference]
    rows = {}
    for name in variants:
        rate = steps / statistics.median(seconds[name])
        rows[name] = {
            "steps_per_second": rate, "seconds_per_epoch": steps_per_epoch / rate,
            "share_of_matmul_peak": rate * flops / peak,
            "speedup_vs_reference": rate / (steps / statistics.median(seconds[reference])),
            "loss_max_abs_diff_vs_reference": float(np.abs(losses[name] - ref_loss).max()),
            "loss_mean_rel_diff_vs_reference": float(np.mean(np.abs(losses[name] - ref_loss) / np.abs(ref_loss))),
            "weights_rel_diff_vs_reference": float((weights[name] - ref_weights).norm() / ref_weights.norm()),
            "mean_loss_last_quarter": float(losses[name][-max(1, steps // 4):].mean()),
            "settings": {k: plain(variants[name][k]) for k in ("fused", "mixed_precision")},
        }
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    cells = [[f"{r['steps_per_second']:.2f}", f"{r['speedup_vs_reference']:.2f}x",
              f"{r['loss_mean_rel_diff_vs_reference']:.1e}", f"{r['weights_rel_diff_vs_reference']:.1e}"]
             for r in rows.values()]
    figures = run.save_figure(text_table(list(rows), ["steps/s", f"vs {reference}", "loss, rel. diff.",
                                                      "weights, rel. diff."], cells,
                                         f"Training {steps} steps at batch {batch} on {where}", verdict=False),
                              "bench_train")
    run.save_arrays("arrays", {**{f"{name}/losses": v for name, v in losses.items()},
                               **{f"{name}/seconds": np.asarray(v) for name, v in seconds.items()}})
    run.write_summary({"variants": rows, "reference": reference, "gflop_per_step": flops / 1e9,
                       "matmul_gflop_per_second": peak / 1e9}, figures=figures, device=where, dtype=str(dtype),
                      steps=steps, repeats=repeats, batch_size=batch, epoch_size=epoch_size)
    print(f"bench_train: one step is {flops / 1e9:.2f} GFLOP (forward and backward); a {MATMUL_SIDE}^3 matmul "
          f"runs at {peak / 1e9:.0f} GFLOP/s here")
    for name, r in rows.items():
        print(f"bench_train {name:>10}: {r['steps_per_second']:.2f} steps/s, {r['seconds_per_epoch']:.2f} s per epoch, "
              f"{r['speedup_vs_reference']:.2f}x {reference}, {r['share_of_matmul_peak']:.0%} of the matmul rate; "
              f"loss {r['loss_mean_rel_diff_vs_reference']:.1e} and weights {r['weights_rel_diff_vs_reference']:.1e} "
              f"from {reference}'s (relative)")


def step_flops(trainer) -> float:
    """Floating-point operations of one training step's forward and backward (torch's count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    return float(counter.get_total_flops())


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype) -> float:
    """What one large matmul achieves here: the rate a compute-bound step cannot beat by much."""
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=dtype)
    return 2 * MATMUL_SIDE**3 / median_seconds(device, lambda: a @ a, 5)
