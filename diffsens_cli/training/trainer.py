"""The resumable training loop: denoising score matching with AdamW, optional EMA and
horizontal flips, on one device or several (accelerate).

What a batch is drawn from is a ``GaussianMixture``: a closed-form target, or the
empirical measure of a set of images; the retraining target ``(1 - eta) rho + eta nu``
is their ``mix``, so every item of a batch is drawn from the mixture itself.  Any
``training.source.BatchSource`` will do (``SharedDraws``: counterfactual retrainings).

Every random draw of step ``k`` (data, flips, times, noise) comes from a generator
seeded by ``(seed, k, process)``, so a run is repeatable and a resumed run takes exactly
the steps an uninterrupted one would have.

A checkpoint (``step-NNNNNNNN/``) holds only formats that load without running code from
the file, since a run directory may be shared: the weights and the EMA weights in
safetensors, the optimizer and lr-scheduler states for ``torch.load(weights_only=True)``,
the losses as ``.npy`` (no pickles), each process's RNG states as JSON, and, written
last, ``trainer.json``: the step, the callback history, the fp16 loss scale (under mixed
precision), what the run was trained with (its fingerprint) and the SHA-256 of every
other file.  It is written under a temporary
name and renamed into place, so a directory that exists is complete.  A resume refuses a
checkpoint trained with other settings, and sets aside (``corrupt-step-...``) one that
fails its checksums or does not load, falling back to the one before.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from diffsens_cli import interrupt, progress
from diffsens_cli.errors import DiffsensError, warn
from diffsens_cli.models.network import NetworkScore, enable_forward_ad
from diffsens_cli.stages import file_digest
from diffsens_cli.training.dsm import dsm_loss
from diffsens_cli.training.settings import TrainSettings
from diffsens_cli.training.source import BatchSource

Loss = Callable[..., torch.Tensor]  # (net, schedule, prediction, x0, t_min, generator) -> the batch's loss

MANIFEST = "trainer.json"
FORMAT = 2  # 1: accelerate's save_state layout, which unpickles on load
MODEL, OPTIMIZER, SCHEDULER, EMA = "model.safetensors", "optimizer.pt", "scheduler.pt", "ema.safetensors"
LOSSES = "losses.npy"
# lr schedules whose value at a step does not depend on the total: such a run may be extended.
TOTAL_FREE_SCHEDULES = ("constant", "constant_with_warmup")
_MISSING = object()


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back as it was written."""


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary and set-aside directories are never listed)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step-*") if (p / MANIFEST).is_file())


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer.json``, once every file it lists matches its SHA-256."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:  # ValueError: undecodable bytes or bad JSON
        raise CorruptCheckpoint(f"{MANIFEST} is not readable JSON ({_one_line(e)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    if not isinstance(files, dict):
        raise CorruptCheckpoint(f"{MANIFEST} is not a format-{FORMAT} checkpoint manifest")
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).name != name or not (ckpt / name).is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if file_digest(ckpt / name) != digest:
            raise CorruptCheckpoint(f"{name} does not match its checksum in {MANIFEST}")
    return manifest


def check_resumable(checkpoint_dir: Path, fingerprint: dict[str, Any], settings: TrainSettings) -> None:
    """Refuse (one-line DiffsensError) if the newest checkpoint in ``checkpoint_dir`` that
    passes its checksums was trained with other settings; checks nothing else, writes nothing."""
    for ckpt in reversed(list_checkpoints(checkpoint_dir)):
        try:
            manifest = read_manifest(ckpt)
        except CorruptCheckpoint:
            continue
        check_compatible(ckpt, manifest, _as_json(fingerprint), settings)
        return


def check_compatible(ckpt: Path, manifest: dict[str, Any], fingerprint: dict[str, Any],
                     settings: TrainSettings) -> None:
    """Refuse (one-line DiffsensError) to resume ``ckpt`` with other settings: its fingerprint
    must be ``fingerprint``; its total steps may change only where the lr schedule ignores
    the total, and never to fewer than the checkpoint has taken."""
    old, new = _flatten(manifest.get("fingerprint")), _flatten(_as_json(fingerprint))
    diffs = [f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
             for key in sorted(old.keys() | new.keys()) if old.get(key, _MISSING) != new.get(key, _MISSING)]
    step, total = manifest.get("step"), manifest.get("total_steps")
    if not isinstance(step, int) or step > settings.steps:
        diffs.append(f"steps: {total!r} -> {settings.steps} (the checkpoint is at step {step!r})")
    elif total != settings.steps and settings.lr_scheduler not in TOTAL_FREE_SCHEDULES:
        diffs.append(f"steps: {total!r} -> {settings.steps} (lr_scheduler {settings.lr_scheduler} depends on it)")
    if diffs:
        raise DiffsensError(f"checkpoint {ckpt} was trained with other settings: {'; '.join(diffs)}; "
                            f"to start afresh, use another hydra.run.dir or delete {ckpt.parent}")


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return out


def _one_line(error: BaseException) -> str:
    """An exception's first line, cut to 200 characters (some loaders explain at length).
    torch.load's refusal of a pickle says what it refused, not its first line, which
    suggests re-running with weights_only=False (diffsens never does)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        refused = next((line for line in lines[1:] if not line.startswith("Check the documentation")), "")
        return f"torch.load(weights_only=True) refused it, nothing of it was run: {refused[:200]}"
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _rng_states() -> dict[str, Any]:
    """This process's global RNG states (python, numpy, torch CPU and CUDA), as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if torch.cuda.is_available():  # the devices both runs see (a resume may see fewer or more)
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(state, dtype=torch.uint8), index)


class Trainer:
    """Trains ``model.net`` on draws from ``source`` reshaped to ``event_shape`` by ``loss``
    (denoising score matching; ``dsm.second_moment_loss`` for a trace head); its checkpoints
    record ``fingerprint`` (default: the settings' own) to refuse a resume with other settings."""

    def __init__(self, model: NetworkScore, source: BatchSource, event_shape: tuple[int, ...],
                 settings: TrainSettings, checkpoint_dir: Path, cpu: bool = True,
                 fingerprint: dict[str, Any] | None = None, loss: Loss = dsm_loss):
        self.cfg = settings
        self.loss = loss
        self.fingerprint = _as_json(settings.fingerprint() if fingerprint is None else fingerprint)
        self.accelerator = Accelerator(cpu=cpu)
        self.device = self.accelerator.device
        self.schedule, self.prediction = model.schedule, model.prediction
        net = model.net.to(self.device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                      fused=settings.fused or None)
        lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                                     num_training_steps=settings.steps)
        self.net, self.optimizer, self.lr_scheduler = self.accelerator.prepare(net, optimizer, lr_scheduler)
        self.ema = EMAModel(self.net.parameters(), decay=settings.ema_decay,
                            foreach=settings.fused) if settings.ema_decay else None
        dtype = next(net.parameters()).dtype
        if settings.mixed_precision == "bf16" and dtype == torch.float64:
            raise DiffsensError("train.mixed_precision: bf16 autocast leaves a float64 network in float64; "
                                "train in float32 (solver.dtype=float32) or set train.mixed_precision=no")
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

    def train_step(self) -> torch.Tensor:
        """One optimizer step on a fresh batch (step ``self.step``'s draws); its loss, on the device."""
        gen = self._generator()
        x0 = self._batch(gen)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16"):
            loss = self.loss(self.net, self.schedule, self.prediction, x0, self.cfg.t_min, gen)
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
        bar = progress.bar(total=until, initial=self.step, desc="train", enabled=self.cfg.progress, leave=False)
        pending: list[torch.Tensor] = []
        if callback is not None and every and self.step == 0 and not self.history:
            self.history.append({"step": 0, **callback(self)})
        # A stop signal (one process: with several, each would stop at another step) ends
        # the step under way; the steps since the last checkpoint are saved, then it stops.
        single = self.accelerator.num_processes == 1
        saved, whole_steps = self.step, True
        try:
            with interrupt.at_step_boundaries() if single else contextlib.nullcontext():
                while self.step < until:
                    interrupt.check()
                    whole_steps = False
                    pending.append(self.train_step())
                    whole_steps = True
                    bar.update(1)
                    due_callback = callback is not None and every and (self.step % every == 0 or self.step == until)
                    due_checkpoint = self.step % self.cfg.checkpoint_every == 0 or self.step == until
                    if due_callback or due_checkpoint or len(pending) >= 50:
                        self._flush(pending)  # one device sync per 50 steps
                        bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4g}")
                    if due_callback and not any(h.get("step") == self.step for h in self.history):
                        whole_steps = False  # a step is saved with its callback's result or not at all
                        self.history.append({"step": self.step, **callback(self)})
                        whole_steps = True
                    if due_checkpoint:
                        self.save_checkpoint()
                        saved = self.step
                interrupt.check()  # a signal during the last step
        except KeyboardInterrupt:
            if single and whole_steps and self.step > saved:
                self._flush(pending)
                self.save_checkpoint()
            raise
        bar.close()

    def _flush(self, pending: list[torch.Tensor]) -> None:
        """Move the losses of the steps in ``pending`` to ``losses`` (one device sync) and
        empty it; a non-finite loss stops the training (a DiffsensError naming its step)
        before any checkpoint of weights it has touched is written."""
        if pending:
            first = self.step - len(pending) + 1
            losses = torch.stack(pending).float().cpu().tolist()
            pending.clear()
            bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
            if self.accelerator.num_processes > 1:  # every process stops, or the others wait in the next step
                flag = torch.tensor([float(bad is not None)], device=self.accelerator.device)
                anywhere = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
            else:
                anywhere = bad is not None
            if anywhere:
                kept = self.checkpoints()
                what = f"the loss became {losses[bad]} at step {first + bad}" if bad is not None else \
                    f"another process's loss became non-finite by step {self.step}"
                raise DiffsensError(
                    f"training: {what}; stopped there, nothing saved after it "
                    f"({f'the last checkpoint, {kept[-1].name}, is kept' if kept else 'no checkpoint yet'})"
                    f": lower train.lr (now {self.cfg.lr:g}) or check the data")
            self.losses += losses

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
    def _state(self) -> dict[str, Any]:
        """A copy of everything a checkpoint holds, in memory (to undo a failed load)."""
        state = {
            "model": {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(self.net).state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.lr_scheduler.state_dict()),
            "rng": _rng_states(), "step": self.step, "losses": list(self.losses),
            "history": copy.deepcopy(self.history),
            "scaler": None if self.accelerator.scaler is None else self.accelerator.scaler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = {k: [p.clone() for p in v] if k == "shadow_params" else v
                            for k, v in self.ema.state_dict().items()}
        return state

    def _apply(self, state: dict[str, Any]) -> None:
        """Take on a state of ``_state``'s form."""
        self.accelerator.unwrap_model(self.net).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        if self.accelerator.scaler is not None and state.get("scaler") is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if state.get("rng") is not None:
            _set_rng_states(state["rng"])
        self.step, self.losses, self.history = int(state["step"]), list(state["losses"]), list(state["history"])

    def save_checkpoint(self) -> Path:
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        if final.exists():
            return final
        if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):  # a finite loss, then a bad step
            kept = self.checkpoints()
            raise DiffsensError(
                f"training: the weights are not finite at step {self.step}; stopped, nothing saved after "
                f"{kept[-1].name if kept else 'step 0'}: lower train.lr (now {self.cfg.lr:g}) or check the data")
        tmp = self.checkpoint_dir / f".tmp-step-{self.step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        (tmp / f"rng-{self.accelerator.process_index}.json").write_text(json.dumps(_rng_states()))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            weights = self.accelerator.unwrap_model(self.net).state_dict()
            save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / MODEL)
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER)
            torch.save(self.lr_scheduler.state_dict(), tmp / SCHEDULER)
            np.save(tmp / LOSSES, np.asarray(self.losses, dtype=np.float64))
            manifest = {"format": FORMAT, "step": self.step, "total_steps": self.cfg.steps,
                        "fingerprint": self.fingerprint, "history": self.history,
                        "scaler": None if self.accelerator.scaler is None else self.accelerator.scaler.state_dict()}
            if self.ema is not None:
                ema = self.ema.state_dict()
                shadow = ema.pop("shadow_params")
                save_file({str(i): p.contiguous().cpu() for i, p in enumerate(shadow)}, tmp / EMA)
                manifest["ema"] = ema
            manifest["files"] = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            tmp.rename(final)
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _load(self, ckpt: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """The state of a verified checkpoint, read with loaders that unpickle no objects."""
        files = manifest["files"]

        def path(name: str) -> Path:
            if name not in files:
                raise CorruptCheckpoint(f"{MANIFEST} lists no {name}")
            return ckpt / name

        with warnings.catch_warnings():  # torch warns about odd pickles: the failure is reported in one line
            warnings.simplefilter("ignore")
            state = {
                "model": load_file(path(MODEL)),
                "optimizer": torch.load(path(OPTIMIZER), map_location="cpu", weights_only=True),
                "scheduler": torch.load(path(SCHEDULER), map_location="cpu", weights_only=True),
                "losses": np.load(path(LOSSES), allow_pickle=False).tolist(),
                "step": manifest["step"], "history": manifest["history"], "scaler": manifest.get("scaler"),
            }
        if self.ema is not None:
            shadow = load_file(path(EMA))
            state["ema"] = {**manifest["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]}
        rng = f"rng-{self.accelerator.process_index}.json"
        state["rng"] = json.loads(path(rng).read_text()) if rng in files else None  # None: other process count
        return state

    def _set_aside(self, ckpt: Path, problem: str) -> None:
        """Rename a checkpoint that fails to ``corrupt-step-NNNNNNNN-<time>``, with one warning line."""
        aside = ckpt.with_name(f"corrupt-{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        self.accelerator.wait_for_everyone()
        why = "another process renames it"
        if self.accelerator.is_main_process:
            try:
                os.rename(ckpt, aside)
                warn(f"checkpoint {ckpt} fails its check: {problem}; set aside as {aside.name}")
            except OSError as e:
                why = e.strerror
        self.accelerator.wait_for_everyone()
        if ckpt.exists():  # every process stops, not only the one that tried (no one waits forever)
            raise DiffsensError(f"checkpoint {ckpt} fails its check ({problem}) and cannot be set aside "
                                f"({why}): move it away, or train into another hydra.run.dir")

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary directories are never listed)."""
        return list_checkpoints(self.checkpoint_dir)

    def resume(self) -> bool:
        """Load the newest checkpoint that passes its checks, if any; True if one was loaded.
        One that fails (missing file, checksum, unreadable) is set aside with a warning and
        the one before is tried; one trained with other settings stops with a DiffsensError."""
        found = self.checkpoints()
        if not found:
            return False
        initial = self._state()
        for ckpt in reversed(found):
            try:
                manifest = read_manifest(ckpt)
            except CorruptCheckpoint as e:
                self._set_aside(ckpt, str(e))
                continue
            check_compatible(ckpt, manifest, self.fingerprint, self.cfg)
            try:
                state = self._load(ckpt, manifest)
            # The files are untrusted: safetensors, torch's unpickler, numpy and JSON each
            # raise their own errors, and any of them means "not this one".
            except Exception as e:  # noqa: BLE001
                self._set_aside(ckpt, _one_line(e))
                continue
            try:
                self._apply(state)
            except Exception as e:  # noqa: BLE001 (read back whole, yet it does not fit this model or machine)
                self._apply(initial)
                raise DiffsensError(f"checkpoint {ckpt} passed its checks but cannot be resumed here "
                                    f"({_one_line(e)}); to start afresh, use another hydra.run.dir or delete "
                                    f"{ckpt.parent}") from None
            return True
        if self.accelerator.is_main_process:
            warn(f"no usable checkpoint is left in {self.checkpoint_dir}: training starts from step 0")
        return False


def train_to_completion(model: NetworkScore, source: BatchSource, event_shape: tuple[int, ...],
                        settings: TrainSettings, directory: Path, cpu: bool = True,
                        fingerprint: dict[str, Any] | None = None) -> tuple[NetworkScore, Trainer]:
    """Train (resuming from ``directory/checkpoints`` if it was trained with ``fingerprint``),
    then save the sampling model to ``directory/model`` in save_pretrained layout; returns it
    and the trainer."""
    from diffsens_cli.models.pretrained import save_pretrained

    trainer = Trainer(model, source, event_shape, settings, directory / "checkpoints", cpu=cpu,
                      fingerprint=fingerprint)
    trainer.resume()
    trainer.train()
    final = trainer.sampling_model()
    if trainer.accelerator.is_main_process:
        save_pretrained(final, directory / "model")
    trainer.accelerator.wait_for_everyone()
    return final, trainer
