"""Training settings, kept apart from the loop so that checking a config stays light."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Keys of the ``train`` group that change no result (display and checkpoint bookkeeping):
# a resumed run may change them freely.
BOOKKEEPING = ("progress", "checkpoint_every", "keep_checkpoints")


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

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the result, but the total number of steps (a resumed
        run checks that apart: it may grow): what a checkpoint records by default."""
        return {"train": {k: v for k, v in asdict(self).items() if k not in (*BOOKKEEPING, "steps")}}
