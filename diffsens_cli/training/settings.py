"""Training settings and their checked reading from the ``train`` group, kept apart from
the loop so that checking a config stays light."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig

from diffsens_cli.data import data_depends
from diffsens_cli.errors import flag, number, one_of, plain, require, whole

# Keys of the ``train`` group that change no result (display and checkpoint bookkeeping):
# a resumed run may change them freely.
BOOKKEEPING = ("progress", "checkpoint_every", "keep_checkpoints")


@dataclass
class TrainSettings:
    """What the loop needs from the ``train`` config group (configs/train/default.yaml
    holds the defaults and says what each setting means), read by ``train_settings``."""

    steps: int
    batch_size: int  # the effective batch: split over processes
    lr: float
    lr_scheduler: str  # diffusers.optimization.get_scheduler's names
    lr_warmup_steps: int
    weight_decay: float
    ema_decay: float | None
    hflip: bool
    t_min: float
    grad_clip: float | None
    checkpoint_every: int
    keep_checkpoints: int
    seed: int
    progress: bool
    fused: bool = True  # AdamW's fused kernel and the EMA's foreach update (False: the per-tensor loops)
    mixed_precision: str = "no"  # no | bf16: the loss under torch.autocast (weights and optimizer stay as they are)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the result, but the total number of steps (a resumed
        run checks that apart: it may grow): what a checkpoint records by default."""
        return {"train": {k: v for k, v in asdict(self).items() if k not in (*BOOKKEEPING, "steps")}}


TRAIN_MODES = ("base", "retrain", "finetune")
MIXED_PRECISION = ("no", "bf16")
# The total a run trains for: a resumed run may grow it (the trainer checks it apart).
TOTAL = ("steps", "epochs")


def training_depends(cfg: DictConfig, train: DictConfig, dtype: str,
                     start: dict[str, Any] | None = None) -> dict[str, Any]:
    """What trained weights depend on, decided here only: ``train`` (the train group with
    its mode) but its bookkeeping, and ``eta_bar`` only when retraining; the data set;
    where training starts, ``start`` (e.g. the key of a base model's stage), by default
    the model and schedule groups; the set S unless the mode is base; and ``dtype``. A
    stage's key as it is; a checkpoint records ``resumable(...)`` of it."""
    settings = {k: v for k, v in plain(train).items() if k not in BOOKKEEPING}
    if settings["mode"] != "retrain":
        settings.pop("eta_bar")
    depends: dict[str, Any] = {"train": settings, "dtype": dtype, "dataset": data_depends(cfg.dataset)}
    depends |= start if start is not None else {"model": plain(cfg.model), "schedule": plain(cfg.schedule)}
    if settings["mode"] != "base":
        depends["perturbation"] = data_depends(cfg.perturbation, "perturbation")
    return depends


def resumable(depends: dict[str, Any]) -> dict[str, Any]:
    """``depends`` without the total to train for, which a resumed run may change: what
    a checkpoint records and a resume must match."""
    return depends | {"train": {k: v for k, v in depends["train"].items() if k not in TOTAL}}


def train_settings(cfg: DictConfig, epoch_size: int | None) -> TrainSettings:
    """Checked ``TrainSettings`` from the ``train`` group; ``epoch_size`` is the number of
    training items one epoch passes over (None for an endless source such as a
    closed-form target, which needs ``train.steps``)."""
    one_of(cfg.mode, TRAIN_MODES, "train.mode")
    batch_size = whole(cfg.batch_size, "train.batch_size", at_least=1)
    steps = whole(cfg.steps, "train.steps", null=True, at_least=1)
    if steps is None:
        require(epoch_size is not None, "train.steps", "an endless data source (a closed-form target) needs steps")
        epochs = number(cfg.epochs, "train.epochs", null=True)
        require(epochs is not None and epochs > 0, "train.epochs", f"must be > 0, got {cfg.epochs}")
        steps = max(1, math.ceil(epochs * epoch_size / batch_size))
    lr = number(cfg.lr, "train.lr")
    require(lr > 0, "train.lr", f"must be > 0, got {lr}")
    lr_schedulers = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    lr_scheduler = one_of(cfg.lr_scheduler, lr_schedulers, "train.lr_scheduler")
    lr_warmup_steps = whole(cfg.lr_warmup_steps, "train.lr_warmup_steps", at_least=0)
    weight_decay = number(cfg.weight_decay, "train.weight_decay")
    require(weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {weight_decay}")
    ema_decay = number(cfg.ema_decay, "train.ema_decay", null=True)
    require(ema_decay is None or 0 < ema_decay < 1, "train.ema_decay", f"must be null or in (0, 1), got {ema_decay}")
    eta_bar = number(cfg.eta_bar, "train.eta_bar")
    require(0 < eta_bar < 1, "train.eta_bar", f"must be in (0, 1), got {eta_bar}")
    t_min = number(cfg.t_min, "train.t_min")
    require(0 < t_min < 1, "train.t_min", f"must be in (0, 1), got {t_min}")
    grad_clip = number(cfg.grad_clip, "train.grad_clip", null=True)
    require(grad_clip is None or grad_clip > 0, "train.grad_clip", f"must be null or > 0, got {grad_clip}")
    checkpoint_every = whole(cfg.checkpoint_every, "train.checkpoint_every", at_least=1)
    keep_checkpoints = whole(cfg.keep_checkpoints, "train.keep_checkpoints", at_least=1)
    mixed_precision = one_of(cfg.mixed_precision, MIXED_PRECISION, "train.mixed_precision")
    return TrainSettings(
        steps=steps, batch_size=batch_size, lr=lr, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
        weight_decay=weight_decay, ema_decay=ema_decay, hflip=flag(cfg.hflip, "train.hflip"), t_min=t_min,
        grad_clip=grad_clip, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        seed=whole(cfg.seed, "train.seed"), progress=flag(cfg.progress, "train.progress"),
        fused=flag(cfg.fused, "train.fused"), mixed_precision=mixed_precision,
    )
