"""The resumable training loop: denoising score matching with AdamW, optional EMA and
horizontal flips, on one device or several (accelerate).

What a batch is drawn from is a ``GaussianMixture``: a closed-form target, or the
empirical measure of a set of images; the retraining target ``(1 - eta) rho + eta nu``
is their ``mix``, so every item of a batch is drawn from the mixture itself.

Every random draw of step ``k`` (data, flips, times, noise) comes from a generator
seeded by ``(seed, k, process)``, so a run is repeatable and a resumed run takes exactly
the steps an uninterrupted one would have.  Checkpoints (``step-NNNNNNNN/``: the
accelerate state with model, optimizer and RNG states, the EMA weights, the loss
history) are written under a temporary name and renamed into place, so a directory
that exists is complete.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffsens_cli import interrupt
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.models.network import NetworkScore, enable_forward_ad
from diffsens_cli.training.dsm import dsm_loss
from diffsens_cli.training.settings import TrainSettings

logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint


class Trainer:
    """Trains ``model.net`` on draws from ``source`` reshaped to ``event_shape``."""

    def __init__(self, model: NetworkScore, source: GaussianMixture, event_shape: tuple[int, ...],
                 settings: TrainSettings, checkpoint_dir: Path, cpu: bool = True):
        self.cfg = settings
        self.accelerator = Accelerator(cpu=cpu)
        self.device = self.accelerator.device
        self.schedule, self.prediction = model.schedule, model.prediction
        net = model.net.to(self.device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                                     num_training_steps=settings.steps)
        self.net, self.optimizer, self.lr_scheduler = self.accelerator.prepare(net, optimizer, lr_scheduler)
        self.ema = EMAModel(self.net.parameters(), decay=settings.ema_decay) if settings.ema_decay else None
        dtype = next(net.parameters()).dtype
        self.source = source.to(self.device, dtype)
        self.event_shape = event_shape
        self.checkpoint_dir = Path(checkpoint_dir)
        self.step = 0
        self.losses: list[float] = []
        self.history: list[dict[str, Any]] = []  # what callbacks measured, kept with checkpoints
        n = self.accelerator.num_processes
        if settings.batch_size % n:
            raise ValueError(f"batch size {settings.batch_size} does not split over {n} processes")
        self.local_batch = settings.batch_size // n

    # -- one step ------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + self.step) * 1009 + self.accelerator.process_index
        return torch.Generator(self.device).manual_seed(seed % (2**63))

    def _batch(self, gen: torch.Generator) -> torch.Tensor:
        x0 = self.source.sample(self.local_batch, gen).view(self.local_batch, *self.event_shape)
        if self.cfg.hflip:
            flip = torch.rand(self.local_batch, generator=gen, device=self.device) < 0.5
            x0 = torch.where(flip.view(-1, *([1] * len(self.event_shape))), x0.flip(-1), x0)
        return x0

    def _train_step(self) -> torch.Tensor:
        gen = self._generator()
        loss = dsm_loss(self.net, self.schedule, self.prediction, self._batch(gen), self.cfg.t_min, gen)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.net.parameters())
        self.step += 1
        return loss.detach()

    # -- the loop ------------------------------------------------------------------
    def train(self, until: int | None = None, every: int | None = None,
              callback: Callable[[Trainer], dict[str, Any]] | None = None) -> None:
        """Train to step ``until`` (default: all steps); at the start, every ``every``
        steps and at the end, call ``callback`` and keep what it returns in ``history``."""
        until = self.cfg.steps if until is None else until
        bar = tqdm(total=until, initial=self.step, desc="train", disable=not self.cfg.progress, leave=False)
        pending: list[torch.Tensor] = []
        if callback is not None and every and self.step == 0 and not self.history:
            self.history.append({"step": 0, **callback(self)})
        while self.step < until:
            interrupt.check()
            pending.append(self._train_step())
            bar.update(1)
            due_callback = callback is not None and every and (self.step % every == 0 or self.step == until)
            due_checkpoint = self.step % self.cfg.checkpoint_every == 0 or self.step == until
            if due_callback or due_checkpoint or len(pending) >= 50:
                self.losses += torch.stack(pending).float().cpu().tolist()  # one device sync per 50 steps
                pending = []
                bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4g}")
            if due_callback and not any(h.get("step") == self.step for h in self.history):
                self.history.append({"step": self.step, **callback(self)})
            if due_checkpoint:
                self.save_checkpoint()
        bar.close()

    def recent_loss(self, window: int) -> float:
        """Mean loss over the last ``window`` steps."""
        return float(np.mean(self.losses[-window:])) if self.losses else math.nan

    def sampling_model(self) -> NetworkScore:
        """A copy of the network to sample and differentiate (the EMA weights if kept), in
        eval mode with the forward-AD fixes; training goes on with the original."""
        net = copy.deepcopy(self.accelerator.unwrap_model(self.net)).eval()
        if self.ema is not None:
            self.ema.copy_to(net.parameters())
        return NetworkScore(enable_forward_ad(net), self.schedule, self.prediction)

    # -- checkpoints ---------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        if final.exists():
            return final
        tmp = self.checkpoint_dir / f".tmp-step-{self.step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / "state"))
        if self.accelerator.is_main_process:
            if self.ema is not None:
                torch.save(self.ema.state_dict(), tmp / "ema.pt")
            np.save(tmp / "losses.npy", np.asarray(self.losses, dtype=np.float64))
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "history": self.history}, indent=1))
            tmp.rename(final)
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary directories are never listed)."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "trainer.json").is_file())

    def resume(self) -> bool:
        """Load the newest finished checkpoint, if any; True if one was loaded."""
        found = self.checkpoints()
        if not found:
            return False
        ckpt = found[-1]
        self.accelerator.load_state(str(ckpt / "state"))
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(ckpt / "ema.pt", map_location="cpu", weights_only=False))
            self.ema.to(self.device)
        meta = json.loads((ckpt / "trainer.json").read_text())
        self.step, self.history = int(meta["step"]), list(meta["history"])
        self.losses = np.load(ckpt / "losses.npy").tolist()
        return True


def train_to_completion(model: NetworkScore, source: GaussianMixture, event_shape: tuple[int, ...],
                        settings: TrainSettings, directory: Path, cpu: bool = True) -> tuple[NetworkScore, Trainer]:
    """Train (resuming from ``directory/checkpoints``), then save the sampling model to
    ``directory/model`` in save_pretrained layout; returns it and the trainer."""
    from diffsens_cli.models.pretrained import save_pretrained

    trainer = Trainer(model, source, event_shape, settings, directory / "checkpoints", cpu=cpu)
    trainer.resume()
    trainer.train()
    final = trainer.sampling_model()
    if trainer.accelerator.is_main_process:
        save_pretrained(final, directory / "model")
    trainer.accelerator.wait_for_everyone()
    return final, trainer
