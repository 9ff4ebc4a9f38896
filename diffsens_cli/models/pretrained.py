"""Score models the user brings: a local directory in diffusers' ``save_pretrained`` layout.

    PATH/unet/config.json                    the network; ``_class_name`` picks UNet2DModel or FourierMLP
    PATH/unet/diffusion_pytorch_model.safetensors   (or .bin, or a sharded index)
    PATH/scheduler/scheduler_config.json     a DDPMScheduler: its betas give the discrete VP
                                             schedule, its ``prediction_type`` what the network predicts

Nothing is downloaded: ``PATH`` must be a local directory.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from diffsens_cli.core.schedule import VPDiscrete, schedule_from_scheduler_config
from diffsens_cli.errors import ConfigError, DiffsensError, require
from diffsens_cli.models.network import FourierMLP, NetworkScore, UNetAdapter, enable_forward_ad

LAYOUT = "expected a diffusers save_pretrained directory with unet/ and scheduler/"
NETWORKS = {"UNet2DModel": UNet2DModel, "FourierMLP": FourierMLP}
WEIGHTS = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
DIFFUSERS_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _read_config(root: Path, name: str) -> dict:
    """The JSON object in ``root/name``, or a one-line ConfigError naming the file."""
    file = root / name
    require(file.is_file(), "model.path", f"{root} has no {name}; {LAYOUT}")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError("model.path", f"{file} is not readable JSON ({e}); {LAYOUT}") from None
    require(isinstance(config, dict), "model.path", f"{file} holds no JSON object; {LAYOUT}")
    return config


def check_pretrained(path: str | os.PathLike) -> tuple[Path, dict, VPDiscrete, str]:
    """Check the layout at ``path`` without loading weights (run before a run directory exists):
    the directory, the network's class name and its config (returned), the scheduler's schedule
    and prediction type, and that weights are present."""
    root = Path(path).expanduser()
    require(root.is_dir(), "model.path", f"{root} is not a directory; {LAYOUT}")
    net_config = _read_config(root, "unet/config.json")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_config(root, "scheduler/scheduler_config.json")
    name = net_config.get("_class_name")
    require(name in NETWORKS, "model.path",
            f"{root / 'unet/config.json'} has _class_name {name!r}; expected one of {', '.join(NETWORKS)}")
    require(any((root / "unet" / w).is_file() for w in WEIGHTS), "model.path",
            f"{root / 'unet'} has no weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}); {LAYOUT}")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    require(prediction in DIFFUSERS_PREDICTIONS, "model.path",
            f"{scheduler_file}: prediction_type {prediction!r} is not one of {', '.join(DIFFUSERS_PREDICTIONS)}")
    try:
        schedule = schedule_from_scheduler_config(scheduler_config)
    except ConfigError as e:
        raise ConfigError("model.path", f"{scheduler_file}: {e}") from None
    steps = net_config.get("num_train_timesteps")
    require(name != "FourierMLP" or steps == schedule.num_train_timesteps, "model.path",
            f"{root / 'unet/config.json'} has num_train_timesteps {steps}, "
            f"but the scheduler has {schedule.num_train_timesteps}")
    return root, net_config, schedule, prediction


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    forward_ad: bool = True) -> NetworkScore:
    """The score model saved at ``path``: network in ``dtype``, the scheduler's discrete
    VP schedule and prediction type; ``forward_ad`` installs the JVP fixes."""
    root, net_config, schedule, prediction = check_pretrained(path)
    name = net_config["_class_name"]
    try:
        net = NETWORKS[name].from_pretrained(root / "unet", torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ConfigError("model.path", f"{root / 'unet'}: cannot load the {name}: {str(e).splitlines()[0]}") from None
    if not isinstance(net, FourierMLP):
        net = UNetAdapter(net).eval()
    if forward_ad:
        enable_forward_ad(net)
    return NetworkScore(net, schedule, prediction)


def save_pretrained(model: NetworkScore, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` in the layout ``load_pretrained`` reads (replacing
    what is there).  Everything is written into a temporary sibling directory first and
    renamed into place, so ``path`` never holds a partly written model."""
    net = model.net.model if isinstance(model.net, UNetAdapter) else model.net
    if not isinstance(net, tuple(NETWORKS.values())):
        raise DiffsensError(f"save_pretrained: cannot save a {type(net).__name__}; expected {', '.join(NETWORKS)}")
    schedule = model.schedule
    if not isinstance(schedule, VPDiscrete) or schedule.scheduler_config is None:
        raise DiffsensError(f"save_pretrained: a {type(schedule).__name__} schedule has no DDPMScheduler config; "
                            "train with schedule=vp_discrete (or a loaded model's schedule)")
    if model.prediction.kind not in DIFFUSERS_PREDICTIONS:
        raise DiffsensError(f"save_pretrained: prediction {model.prediction.kind!r} has no DDPMScheduler "
                            f"prediction_type (one of {', '.join(DIFFUSERS_PREDICTIONS)})")
    scheduler = DDPMScheduler.from_config({**schedule.scheduler_config, "prediction_type": model.prediction.kind})
    root = Path(path).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = root.parent / f".{root.name}.{tag}.tmp", root.parent / f".{root.name}.{tag}.old"
    tmp.mkdir()
    try:
        net.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
    except BaseException:
        if old.exists() and not root.exists():
            os.replace(old, root)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return root
