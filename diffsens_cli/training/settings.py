"""Training settings, kept apart from the loop so that checking a config stays light."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    """What the loop needs from the ``train`` config group."""

    steps: int
    batch_size: int  # the effective batch: split over processes
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler's names
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    ema_decay: float | None = None
    hflip: bool = False
    t_min: float = 1e-3
    grad_clip: float | None = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
