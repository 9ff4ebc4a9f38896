"""``diffsens train``: fit a score network by denoising score matching, in one of the
paper's three modes (base model on rho; retrained on ``(1 - eta_bar) rho + eta_bar S``;
a pretrained model fine-tuned on S), then save it in save_pretrained layout, with its
loss curve and a grid of PF-ODE samples.

A run resumes from the checkpoints in its directory; ``check_run_dir`` refuses, before
anything is written there, a checkpoint that was trained with other settings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.builders import build_schedule, device_and_dtype, solver_settings
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.errors import one_of, require, whole
from diffsens_cli.plots import images as plots
from diffsens_cli.rundir import RunDir
from diffsens_cli.training.settings import TRAIN_MODES, resumable, train_settings, training_depends
from diffsens_cli.training.source import training_source


def check(cfg: DictConfig) -> None:
    mode = one_of(cfg.train.mode, TRAIN_MODES, "train.mode")
    require(mode != "finetune" or cfg.model.kind == "pretrained", "model.kind",
            "fine-tuning starts from a trained model: model=pretrained model.path=DIR")
    train_settings(cfg.train, 1)
    device_and_dtype(cfg.solver)
    solver_settings(cfg.solver)
    build_schedule(cfg.schedule)
    whole(cfg.sample.num_images, "sample.num_images", at_least=0)
    whole(cfg.sample.num_steps, "sample.num_steps", at_least=1)
    from diffsens_cli.pipelines.shared.image_stages import check_data_and_model  # image_stages imports this module

    check_data_and_model(cfg, with_s=mode != "base")


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What the trained weights depend on (``training_depends``) but the total to train
    for: recorded in each checkpoint and checked on resume."""
    return resumable(training_depends(cfg, cfg.train, str(device_and_dtype(cfg.solver)[1])))


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to resume the newest sound checkpoint in ``run_dir`` if it was trained with
    other settings (the trainer checks again when it resumes, and sets aside corrupt ones)."""
    from diffsens_cli.training.trainer import check_resumable, list_checkpoints

    if list_checkpoints(run_dir / "checkpoints"):  # only then is the epoch's size worth loading
        _, _, epoch_size, _ = training_source(cfg)
        check_resumable(run_dir / "checkpoints", fingerprint(cfg), train_settings(cfg.train, epoch_size))


def run(cfg: DictConfig, run: RunDir) -> None:
    from diffsens_cli.models.unet import build_network_model
    from diffsens_cli.training.trainer import train_to_completion

    check(cfg)
    device, dtype = device_and_dtype(cfg.solver)
    source, shape, epoch_size, sizes = training_source(cfg)
    settings = train_settings(cfg.train, epoch_size)
    # Training keeps diffusers' fused kernels; the forward-AD fixes are for sensitivities.
    model = build_network_model(cfg.model, shape, build_schedule(cfg.schedule), dtype=dtype, forward_ad=False)
    model.net.train()
    final, trainer = train_to_completion(model, source, shape, settings, run.path, cpu=device.type == "cpu",
                                         fingerprint=fingerprint(cfg))
    if not trainer.accelerator.is_main_process:  # under `accelerate launch`: one process reports
        return

    n = int(cfg.sample.num_images)
    arrays = {"train_loss": np.asarray(trainer.losses)}
    figures = run.save_figure(plots.loss_curve(trainer.losses), "loss")
    if n:
        gen = torch.Generator(trainer.device).manual_seed(int(cfg.seed))
        t0 = torch.tensor(0.0, dtype=dtype, device=trainer.device)
        z0 = final.sample_base(n, shape, t0, gen)
        solver = replace(solver_settings(cfg.solver), num_steps=int(cfg.sample.num_steps))
        samples = Integrator(final, solver).run(z0).samples
        arrays.update(z0=z0.cpu().numpy(), samples=samples.numpy())
        figures += run.save_figure(plots.image_grid(samples, title=f"{cfg.train.mode} model samples"), "samples")
    run.save_arrays("arrays", arrays)
    run.write_summary(
        {"final_loss": trainer.recent_loss(50), "steps": trainer.step,
         "epochs": trainer.step * settings.batch_size / epoch_size},
        mode=cfg.train.mode, sizes=sizes, model_dir="model", device=str(trainer.device), dtype=str(dtype),
        figures=figures,
    )
