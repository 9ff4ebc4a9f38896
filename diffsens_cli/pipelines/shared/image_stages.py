"""The stages the image experiments share (paper Sec. 4.3, App. E): train a score network
(base, retrained on ``(1 - eta_bar) rho + eta_bar S``, or fine-tuned on S), integrate the
base model's samples with their sensitivities to S, sample a perturbed model from the
same ``z0``, and solve the entropic-OT baseline.

Each stage is a ``StageCache`` entry keyed by the config parts it depends on and by the
keys of the stages it reads, so experiments that share a base model share its training.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.builders import (
    NetworkPrecision,
    build_schedule,
    device_and_dtype,
    network_precision,
    solver_settings,
)
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.transport import transport_rays
from diffsens_cli.data import (
    ImageSet,
    check_images,
    check_perturbation_set,
    data_depends,
    load_images,
    perturbation_set,
)
from diffsens_cli.errors import ConfigError, plain, require, warn
from diffsens_cli.models.network import NetworkScore
from diffsens_cli.models.unet import check_network
from diffsens_cli.sharding import Shard
from diffsens_cli.stages import ArrayDict, StageCache, checksums, stage_key
from diffsens_cli.training.settings import TrainSettings, train_settings, training_depends
from diffsens_cli.training.source import BatchSource, training_measure

# Keys of the solver group that change no result (the half-precision check refuses a run or not).
_SOLVER_DISPLAY = ("progress", "record_every", "batch_size", "tangent_batch_size", "network_dtype_check")
# Images of rho that give the half-precision check its direction where the experiment has no S.
CHECK_DIRECTION_IMAGES = 256
# The engine's random numbers: "keyed" draws them per sample (keyed_random); stages
# computed before, with one stream per chunk, are not reused.
RANDOM_STREAMS = "keyed"


def finetune_config(cfg: DictConfig) -> DictConfig:
    """The ``train`` group with the experiment's fine-tuning overrides (``finetune``) on top."""
    return OmegaConf.merge(cfg.train, cfg.get("finetune") or {}, {"mode": "finetune"})


def solver_depends(solver: DictConfig) -> dict[str, Any]:
    """What of the ``solver`` group a stage's result depends on (not batch sizes or display)."""
    device, _ = device_and_dtype(solver)
    kept = {k: v for k, v in plain(solver).items()
            if k not in _SOLVER_DISPLAY and not (k == "network_dtype" and v is None)}  # keys as before it existed
    return kept | {"device": device.type, "random": RANDOM_STREAMS}


def check_data_and_model(cfg: DictConfig, with_s: bool = True) -> tuple[int, int, int]:
    """rho's data set, S (``with_s``) and the model, without loading images or weights;
    returns the shape (C, H, W) of its images."""
    shape = check_images(cfg.dataset)
    if with_s:
        check_perturbation_set(cfg.perturbation, cfg.dataset, shape)
    check_network(cfg.model, shape)
    return shape


def check_training(cfg: DictConfig) -> None:
    """The training settings of every mode an image experiment may run, its data and model."""
    train_settings(cfg.train, 1)
    train_settings(finetune_config(cfg), 1)
    build_schedule(cfg.schedule)
    require(cfg.perturbation.kind == "image_set", "perturbation",
            f"image experiments need an image set S (perturbation=image_set), got kind {cfg.perturbation.kind!r}")
    check_data_and_model(cfg)


class ImageStages:
    """One image experiment's data, models and stages (see module docstring)."""

    def __init__(self, cfg: DictConfig, cache: StageCache):
        self.cfg, self.cache = cfg, cache
        self.device, self.dtype = device_and_dtype(cfg.solver)
        self.solver = solver_settings(cfg.solver)
        precision = network_precision(cfg.solver)  # checked before any work
        if precision is not None and precision.dtype == torch.float16 and self.device.type == "cpu":
            warn("solver.network_dtype=float16 on a CPU is slower than float32 (6x on the digits UNet: CPUs have no "
                 "fast float16 convolutions); it is meant for GPUs")
        self.shard = Shard.of(cfg)
        self.blocks_mine, self.blocks_all = 0, 0  # block stages this job computed, of all there are
        self._loaded: tuple[Path, NetworkScore] | None = None
        self._half: tuple[tuple[Path, torch.dtype], NetworkScore] | None = None
        self._checked: set[str] = set()  # network_dtype_check stages passed in this process

    # -- data --------------------------------------------------------------------------
    @cached_property
    def rho(self) -> ImageSet:
        return load_images(self.cfg.dataset, cache=self.cache.arrays)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.rho.images.shape[1:])

    def perturbation_set(self, perturbation: DictConfig | None = None) -> ImageSet:
        """S: the images of ``perturbation`` (default: the experiment's)."""
        return perturbation_set(perturbation or self.cfg.perturbation, self.rho, self.cfg.dataset, self.cache.arrays)

    @cached_property
    def S(self) -> ImageSet:  # noqa: N802 (the paper's name)
        return self.perturbation_set()

    # -- training ------------------------------------------------------------------------
    @property
    def pretrained(self) -> bool:
        """Whether the base model is the user's (``model=pretrained``), not trained here."""
        return self.cfg.model.kind == "pretrained"

    @cached_property
    def _pretrained_key(self) -> str:
        """``pretrained/<hash>``: the user's model named by its files' sizes and SHA-256s,
        and the class it is asked for (a class-conditional model's samples are the class's)."""
        files = checksums(Path(self.cfg.model.path).expanduser())
        label = self.cfg.model.get("class_label")
        return f"pretrained/{stage_key(files if label is None else {'files': files, 'class_label': label})}"

    def base(self) -> tuple[str, Path]:
        """The base model's ``name/key`` and directory: the user's own (``model=pretrained``,
        keyed by its files' contents), else the stage ``train_base`` (trained on rho)."""
        if self.pretrained:
            return self._pretrained_key, Path(self.cfg.model.path).expanduser()
        return self.trained("base")

    def _train_depends(self, mode: str) -> dict[str, Any]:
        train = finetune_config(self.cfg) if mode == "finetune" else OmegaConf.merge(self.cfg.train, {"mode": mode})
        if mode == "finetune":  # from the base model's weights
            base = (self._pretrained_key if self.pretrained
                    else self.cache.path("train_base", self._train_depends("base")).name)
            return training_depends(self.cfg, train, str(self.dtype), start={"base": base})
        if self.pretrained:  # the user's architecture and schedule, fresh weights
            return training_depends(self.cfg, train, str(self.dtype), start={"architecture_of": self._pretrained_key})
        return training_depends(self.cfg, train, str(self.dtype))

    def trained(self, mode: str) -> tuple[str, Path]:
        """The stage ``train_<mode>``: its ``name/key`` and its saved model directory.
        Fine-tuning starts from the base model (``base``); retraining from fresh weights of
        the model config's network, or of the user's network's architecture."""
        from diffsens_cli.models.pretrained import fresh_weights
        from diffsens_cli.models.unet import build_network_model

        require(mode != "base" or not self.pretrained, "model.kind",
                "a pretrained model is the base model; it is not trained here")
        depends = self._train_depends(mode)
        name = f"train_{mode}"

        def work(path: Path) -> None:
            train_cfg = finetune_config(self.cfg) if mode == "finetune" else self.cfg.train
            if mode == "finetune":
                model = self.load(self.base()[1], forward_ad=False)
            elif self.pretrained:
                model = fresh_weights(self.load(self.base()[1], forward_ad=False), int(self.cfg.train.seed))
            else:
                model = build_network_model(self.cfg.model, self.event_shape, build_schedule(self.cfg.schedule),
                                            dtype=self.dtype, forward_ad=False)
            model.net.train()
            source, epoch = training_measure(mode, self.rho, self.S if mode != "base" else None,
                                             float(self.cfg.train.eta_bar))
            self.train_network(path, model, source, train_settings(train_cfg, epoch), depends)

        if mode == "finetune":
            self.base()  # train the base model first, outside this stage's lock
        path = self.cache.run(name, depends, work)
        return f"{name}/{path.name}", path / "model"

    def load(self, model_dir: Path, forward_ad: bool = True) -> NetworkScore:
        """The model saved at ``model_dir`` in the run's dtype (on the CPU), asked for the
        run's class (``model.class_label``) if it is class-conditional."""
        from diffsens_cli.models.pretrained import load_pretrained

        return load_pretrained(model_dir, dtype=self.dtype, forward_ad=forward_ad,
                               label=self.cfg.model.get("class_label"))

    def train_network(self, path: Path, model: NetworkScore, source: BatchSource, settings: TrainSettings,
                      fingerprint: dict[str, Any]) -> None:
        """Train ``model`` on ``source`` into the stage directory ``path`` (resuming from its
        checkpoints; the model saved to ``path/model``)."""
        from diffsens_cli.training.trainer import train_to_completion

        train_to_completion(model, source, self.event_shape, settings, path, cpu=self.device.type == "cpu",
                            fingerprint=fingerprint)
        # Checkpoints serve an interrupted stage only; a finished one is its model (and
        # every reuse checks every file of the stage, so gigabytes of them would cost).
        shutil.rmtree(path / "checkpoints")

    def score_model(self, model_dir: Path) -> NetworkScore:
        """A trained model for sampling and JVPs, on the run's device and dtype (the last
        one loaded is kept: every block of a stage integrates with it)."""
        if self._loaded is None or self._loaded[0] != model_dir:
            model = self.load(model_dir)
            model.net.to(self.device)
            self._loaded = (model_dir, model)
        return self._loaded[1]

    def integration_model(self, model: tuple[str, Path], solver: DictConfig | None = None) -> NetworkScore:
        """``score_model`` of ``model`` for integrating with ``solver`` (default the
        experiment's): its network in ``solver.network_dtype`` where set, once
        ``checked_precision`` has passed (the last copy made is kept, as ``score_model`` keeps
        the last model)."""
        full = self.score_model(model[1])
        precision = self.checked_precision(model, solver)
        if precision is None:
            return full
        if self._half is None or self._half[0] != (model[1], precision.dtype):
            self._half = ((model[1], precision.dtype), full.evaluated_in(precision.dtype))
        return self._half[1]

    def checked_precision(self, model: tuple[str, Path], solver: DictConfig | None = None) -> NetworkPrecision | None:
        """``solver.network_dtype`` (default the experiment's solver) for ``model``, after its
        check (the stage ``network_dtype_check``, read when cached; once per process): called
        before any stage that integrates with it is read, so a cached stage is not reused
        past a check that fails now (e.g. at a smaller tolerance)."""
        solver = solver or self.cfg.solver
        precision = network_precision(solver)
        if precision is not None:
            check = stage_key([model[0], solver_depends(solver), plain(solver.network_dtype_check)])
            if check not in self._checked:
                self.network_dtype_check(model, solver, precision)
                self._checked.add(check)
        return precision

    def network_dtype_check(self, model: tuple[str, Path], solver: DictConfig, precision: NetworkPrecision) -> None:
        """Stage: psi of the first ``precision.check_samples`` model samples with the network
        in ``solver.dtype`` and in ``precision.dtype``, toward rho's first
        ``CHECK_DIRECTION_IMAGES`` images (a direction every image experiment has; rounding
        in the network's JVPs does not depend on it); a ConfigError if the half-precision
        psi is not finite or its median relative distance exceeds ``precision.tolerance``,
        else one line saying what was measured."""
        n = precision.check_samples
        depends = {"model": model[0], "solver": solver_depends(solver), "num_samples": n, "seed": int(self.cfg.seed),
                   "direction": {"dataset": data_depends(self.cfg.dataset), "first": CHECK_DIRECTION_IMAGES}}
        name = str(precision.dtype).removeprefix("torch.")
        key = "solver.network_dtype"

        def compute() -> dict[str, np.ndarray]:
            images = self.rho.images[:CHECK_DIRECTION_IMAGES]
            nu = Perturbation([GaussianMixture.empirical(images)]).to(self.device, self.dtype)
            settings = solver_settings(OmegaConf.merge(solver, {"progress": False}))
            full = self.score_model(model[1])
            z0 = self.z0(full, n)
            ref, out = (Integrator(m, settings, nu).run(z0) for m in (full, full.evaluated_in(precision.dtype)))
            if not bool(torch.isfinite(out.psi).all() and torch.isfinite(out.logp).all()):
                wider = "null or bfloat16 (float16's range is +-65504)" if name == "float16" else "null"
                raise ConfigError(key, f"psi or the log-densities of {n} model samples are not finite with the "
                                       f"network in {name}; use {wider}")
            psi = ref.psi.flatten(2)
            size = psi.norm(dim=-1).clamp_min(torch.finfo(psi.dtype).tiny)  # a psi of 0 (no weight): any change is far
            return {"psi_distance": ((out.psi.flatten(2) - psi).norm(dim=-1) / size).flatten().numpy(),
                    "logp_distance": (out.logp - ref.logp).abs().numpy()}

        found = self.cache.arrays("network_dtype_check", depends, compute)
        median, largest = np.median(found["psi_distance"]), found["psi_distance"].max()
        measured = (f"psi of {n} model samples with the network in {name} is {median:.2%} (median; largest "
                    f"{largest:.2%}) from psi in solver.dtype={solver.dtype}")
        if not median <= precision.tolerance:
            raise ConfigError(key, f"{measured}, above solver.network_dtype_check.tolerance={precision.tolerance:g}; "
                                   "use null, another dtype, or a larger tolerance")
        print(f"diffsens: {key}={name} checked: {measured} (tolerance {precision.tolerance:g})",
              file=sys.stderr, flush=True)

    # -- integration ---------------------------------------------------------------------
    def z0(self, model: NetworkScore, n: int) -> torch.Tensor:
        """``n`` starting points from ``model``'s base distribution, drawn on the CPU in
        float64 with the run's seed (so the same on every device and for every model of
        the experiment), then moved to the device."""
        t0 = torch.tensor(self.solver.grid()[0], dtype=torch.float64)
        z0 = model.sample_base(n, self.event_shape, t0, torch.Generator().manual_seed(int(self.cfg.seed)))
        return z0.to(self.device, self.dtype)

    def sensitivity(self, model: tuple[str, Path], n: int, perturbations: list[DictConfig] | None = None,
                    name: str = "sensitivity", solver: DictConfig | None = None) -> tuple[str, ArrayDict | None]:
        """Stage: the base model's samples from ``z0``, their CCoV log-densities and their
        sensitivities ``psi`` [K, B, *event] to each of K image sets S_k (``perturbations``,
        default the experiment's one), all along one path per sample, with the ``solver``
        group (default the experiment's); returns the stage's ``name/key`` and its arrays
        (``size_S`` and ``weights/<count>`` per set: [K]; ``wall_time_s``), None in one
        job of a sharded run (``_in_blocks``)."""
        perturbations = perturbations or [self.cfg.perturbation]
        settings = solver_settings(solver) if solver is not None else self.solver
        self.checked_precision(model, solver)
        depends = {"model": model[0], "perturbations": [data_depends(p, "perturbation") for p in perturbations],
                   "dataset": data_depends(self.cfg.dataset), "solver": solver_depends(solver or self.cfg.solver),
                   "num_samples": n, "seed": int(self.cfg.seed)}

        def compute(start: int, stop: int) -> ArrayDict:
            sets = [self.perturbation_set(p) for p in perturbations]
            signs = [1.0 if p.get("direction", "add") == "add" else -1.0 for p in perturbations]
            nu = Perturbation([GaussianMixture.empirical(s.images) for s in sets], signs).to(self.device, self.dtype)
            score = self.integration_model(model, solver)
            out = Integrator(score, settings, nu).run(self.z0(score, n)[start:stop], first_index=start)
            counts = [w.as_dict() for w in out.weights]
            return {"z0": out.z0.numpy(), "samples": out.samples.numpy(), "psi": out.psi.numpy(),
                    "logp": out.logp.numpy(), "size_S": np.array([len(s) for s in sets]),
                    "wall_time_s": np.array(out.wall_time_s),
                    **{f"weights/{k}": np.array([c[k] for c in counts]) for k in counts[0]}}

        return self._in_blocks(name, depends, n, compute, sample_axis={"psi": 1}, same=("size_S",))

    def _samples_depends(self, model: tuple[str, Path], n: int) -> tuple[str, dict[str, Any]]:
        return "samples_" + model[0].split("/")[0].removeprefix("train_"), {
            "model": model[0], "solver": solver_depends(self.cfg.solver), "num_samples": n, "seed": int(self.cfg.seed)}

    def samples(self, model: tuple[str, Path], n: int) -> ArrayDict | None:
        """Stage: PF-ODE samples of a (perturbed) model from the same ``n`` starting points
        ``z0``, same solver, in blocks (None in one job of a sharded run: ``_in_blocks``)."""
        stage, depends = self._samples_depends(model, n)
        self.checked_precision(model)

        def compute(start: int, stop: int) -> ArrayDict:
            score = self.integration_model(model)
            return {"samples": Integrator(score, self.solver).run(self.z0(score, n)[start:stop], first_index=start)
                    .samples.numpy()}

        return self._in_blocks(stage, depends, n, compute)[1]

    def samples_of_rows(self, model: tuple[str, Path], n: int, rows: list[int]) -> ArrayDict:
        """Stage: like ``samples``, from the ``rows`` of the ``n`` starting points only, in one stage."""
        stage, depends = self._samples_depends(model, n)
        self.checked_precision(model)

        def compute() -> ArrayDict:
            score = self.integration_model(model)
            return {"samples": Integrator(score, self.solver).run(self.z0(score, n)[rows]).samples.numpy()}

        return self.cache.arrays(stage, depends | {"rows": rows}, compute)

    def _in_blocks(self, name: str, depends: dict[str, Any], n: int, compute: Callable[[int, int], ArrayDict],
                   sample_axis: dict[str, int] | None = None,
                   same: tuple[str, ...] = ()) -> tuple[str, ArrayDict | None]:
        """Stage ``name`` over ``n`` model samples as stages of ``shard.block`` rows each
        (``compute(start, stop)``; all ``n`` in one: keyed by ``depends`` alone, as before
        blocks existed).  Returns the ``name/key`` of the whole and the blocks joined along
        each array's sample axis (0 unless ``sample_axis`` says; ``wall_time_s`` and
        ``weights/*`` summed; ``same`` taken from the first), or None in one job of a
        sharded run, which computes its share only."""
        blocks = [(depends if (a, b) == (0, n) else depends | {"block": [a, b]}, a, b) for a, b in self.shard.blocks(n)]
        todo = self.shard.mine(blocks, first=self.blocks_all)  # numbered on across the run's block stages
        self.blocks_mine, self.blocks_all = self.blocks_mine + len(todo), self.blocks_all + len(blocks)
        parts = [self.cache.arrays(name, d, lambda a=a, b=b: compute(a, b)) for d, a, b in todo]
        keys = [self.cache.path(name, d).name for d, _, _ in blocks]
        key = f"{name}/{keys[0] if len(keys) == 1 else stage_key(keys)}"
        if self.shard.partial:
            return key, None
        axes = sample_axis or {}

        def joined(field: str) -> np.ndarray:
            values = [p[field] for p in parts]
            if field in same:
                return values[0]
            if field == "wall_time_s" or field.startswith("weights/"):
                return np.sum(values, axis=0)
            return np.concatenate(values, axis=axes.get(field, 0))

        return key, {field: joined(field) for field in parts[0]}

    # -- the baseline --------------------------------------------------------------------
    def transport(self, mode: str, base: tuple[str, ArrayDict]) -> ArrayDict:
        """Stage: entropic-OT transport rays from the base samples to the perturbed target:
        ``(1 - eta_bar) rho + eta_bar S`` after retraining (its two point sets weighted so),
        S after fine-tuning."""
        ot = self.cfg.ot
        eta = float(self.cfg.train.eta_bar)
        depends = {"samples": base[0], "mode": mode, "ot": plain(ot), "dataset": data_depends(self.cfg.dataset),
                   "perturbation": data_depends(self.cfg.perturbation, "perturbation"),
                   "eta_bar": eta if mode == "retrain" else None}

        def compute() -> ArrayDict:
            x = torch.from_numpy(base[1]["samples"])
            s = self.S.images.to(x.dtype)
            if mode == "retrain":
                rho = self.rho.images.to(x.dtype)
                y = torch.cat([rho, s])
                b = torch.cat([torch.full((len(rho),), (1 - eta) / len(rho)), torch.full((len(s),), eta / len(s))])
            else:
                y, b = s, None
            out = transport_rays(x, y, reg=float(ot.reg), metric=str(ot.metric), target_weights=b)
            return {"rays": out.rays.numpy(), "marginal_error": torch.tensor(out.marginal_error).numpy()}

        return self.cache.arrays(f"ot_{mode}", depends, compute)
