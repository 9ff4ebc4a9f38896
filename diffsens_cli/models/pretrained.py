"""Score models the user brings: a local directory in diffusers' ``save_pretrained`` layout.

    PATH/unet/config.json                    the network; ``_class_name`` picks UNet2DModel or FourierMLP
    PATH/unet/diffusion_pytorch_model.safetensors   (or .bin, or a sharded index)
    PATH/scheduler/scheduler_config.json     a DDPMScheduler: its betas give the discrete VP
                                             schedule, its ``prediction_type`` what the network predicts

Nothing is downloaded: ``PATH`` must be a local directory.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from diffsens_cli.core.schedule import VPDiscrete
from diffsens_cli.errors import ConfigError, DiffsensError, one_of, require, whole
from diffsens_cli.models.network import FourierMLP, NetworkScore, UNetAdapter, enable_forward_ad

LAYOUT = "expected a diffusers save_pretrained directory with unet/ and scheduler/"
NETWORKS = {"UNet2DModel": UNet2DModel, "FourierMLP": FourierMLP}
WEIGHTS = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# diffusers' schedulers whose noise schedule is a discrete VP one, set by the betas of
# beta_schedule, beta_start, beta_end, num_train_timesteps (or trained_betas) exactly as
# DDPMScheduler sets them; they differ only in how they sample, which diffsens does itself.
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                 "DDPMParallelScheduler", "DDIMParallelScheduler")
_DDPM_KEYS = frozenset(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> VPDiscrete:
    """The discrete VP schedule of a diffusers scheduler config of one of ``VP_SCHEDULERS``
    (``beta_start``, ``beta_end``, ``num_train_timesteps``, ``beta_schedule``, ...), with
    the betas diffusers' ``DDPMScheduler`` computes from it (so they match its own exactly;
    the keys only other schedulers have, which choose their sampling steps, are left out)."""
    name = config.get("_class_name", "DDPMScheduler")
    require(name in VP_SCHEDULERS, "scheduler._class_name",
            f"{name!r} is not a scheduler with a discrete VP noise schedule diffsens reads "
            f"(one of {', '.join(VP_SCHEDULERS)})")
    one_of(config.get("beta_schedule", "linear"), BETA_SCHEDULES, "scheduler.beta_schedule")
    require(not config.get("rescale_betas_zero_snr", False), "scheduler.rescale_betas_zero_snr",
            "zero terminal SNR (alpha = 0 at the noise end) is not supported")
    try:
        betas = DDPMScheduler.from_config({k: v for k, v in config.items() if k in _DDPM_KEYS}).betas
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError("scheduler", f"DDPMScheduler cannot use this config: {str(e).splitlines()[0]}") from None
    return VPDiscrete.from_betas(betas, config)


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
    if (root / "model_index.json").is_file():  # a pipeline's folder: its unet/ and scheduler/ are what is read
        latent = [k for k in ("vae", "vqvae") if k in _read_config(root, "model_index.json")]
        require(not latent, "model.path", f"{root / 'model_index.json'} lists a {latent[0] if latent else ''}: "
                "a latent diffusion model's scores live in its latent space, not on the images diffsens reads")
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
    _check_network_shapes(root / "unet", NETWORKS[name], net_config)
    return root, net_config, schedule, prediction


POSITIVE_SETTINGS = ("layers_per_block", "attention_head_dim", "norm_num_groups", "block_out_channels")


def _check_network_shapes(folder: Path, network: type, config: dict) -> None:
    """The network ``config`` describes, built without memory (torch's meta device), must
    build with positive sizes, and every parameter it needs must be in the safetensors
    weights beside it with the same shape (read from their headers, nothing loaded; old
    attention key names renamed as diffusers does on load; extra keys are diffusers' to
    warn of): a config that does not match its weights is refused before it can ask for
    gigabytes."""
    where = folder / "config.json"
    for key in POSITIVE_SETTINGS:
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        require(value is None or all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values),
                "model.path", f"{where} has {key} {value!r}; expected whole numbers >= 1")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = network.from_config(config)
            shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    except Exception as e:  # noqa: BLE001 -- any way a bad config fails to build is one line
        raise ConfigError("model.path", f"{where} does not describe a network that builds: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    stored = _safetensors_shapes(folder)
    if stored is None:  # .bin weights: their shapes are known only once loaded (diffusers compares them then)
        return
    rename = getattr(net, "_fix_state_dict_keys_on_load", None)
    if rename is not None:
        renamed = rename(stored)
        stored = renamed if isinstance(renamed, dict) else stored
    wrong = [k for k in shapes if k in stored and shapes[k] != stored[k]] or [k for k in shapes if k not in stored]
    if wrong:
        key = wrong[0]
        raise ConfigError("model.path", f"{where} does not match the weights beside it: {key} is "
                                        f"{_shape_text(shapes[key])} by the config and "
                                        f"{_shape_text(stored.get(key))} in the weights")


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape in ``folder``'s safetensors weights (one file or an index of
    shards), from the files' headers; None where the weights are not safetensors."""
    from safetensors import safe_open

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        files = [folder / SAFETENSORS_WEIGHTS_NAME]
    elif index.is_file():
        try:
            files = sorted({folder / str(f) for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError("model.path", f"{index} is not a weight index ({e})") from None
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no __iter__)
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
            raise ConfigError("model.path", f"{file} is not a readable safetensors file ({e})") from None
    return shapes


def class_label(net_config: Mapping[str, Any], label: Any, where: Path) -> int | None:
    """The class a class-conditional ``UNet2DModel`` (``num_class_embeds`` classes) is asked
    for, for every sample: ``model.class_label``, which must be null for any other network."""
    kind, classes = net_config.get("class_embed_type"), net_config.get("num_class_embeds")
    require(kind is None, "model.path", f"{where} has class_embed_type {kind!r}, which takes embeddings; "
            "class-conditional models read class numbers through num_class_embeds only")
    if classes is None:
        require(label is None, "model.class_label",
                f"must be null: the model at {where} is not class-conditional (no num_class_embeds), got {label!r}")
        return None
    require(label is not None, "model.class_label",
            f"the model at {where} is class-conditional ({classes} classes): set it to one of 0..{classes - 1}")
    number = whole(label, "model.class_label", at_least=0)
    require(number < classes, "model.class_label", f"must be in 0..{classes - 1} ({where} has {classes} classes), "
            f"got {number}")
    return number


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, forward_ad: bool = True,
                    label: int | None = None) -> NetworkScore:
    """The score model saved at ``path``: network in ``dtype``, the scheduler's discrete
    VP schedule and prediction type; ``forward_ad`` installs the JVP fixes; ``label``:
    the class a class-conditional UNet is asked for (``class_label``)."""
    root, net_config, schedule, prediction = check_pretrained(path)
    label = class_label(net_config, label, root)
    name = net_config["_class_name"]
    try:
        # .bin weights alone: said so, or diffusers first looks for safetensors and logs an
        # error and "Defaulting to unsafe serialization" (it reads .bin with weights_only=True)
        safetensors = any((root / "unet" / w).is_file() for w in (SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
        net = NETWORKS[name].from_pretrained(root / "unet", torch_dtype=dtype, local_files_only=True,
                                             use_safetensors=safetensors)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ConfigError("model.path", f"{root / 'unet'}: cannot load the {name}: {str(e).splitlines()[0]}") from None
    if not isinstance(net, FourierMLP):
        net = UNetAdapter(net, label).eval()
    if forward_ad:
        enable_forward_ad(net)
    return NetworkScore(net, schedule, prediction)


def fresh_weights(model: NetworkScore, seed: int) -> NetworkScore:
    """``model``'s network with freshly initialised weights (seeded; what retraining from
    scratch starts from), keeping its architecture, class, dtype, schedule and prediction."""
    net = model.net.model if isinstance(model.net, UNetAdapter) else model.net
    dtype = next(net.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = torch.nn.Module.to(type(net).from_config(net.config), dtype)  # ModelMixin.to warns of nothing
    if isinstance(model.net, UNetAdapter):
        fresh = UNetAdapter(fresh, model.net.class_label)
    return NetworkScore(fresh.eval(), model.schedule, model.prediction)


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
    ddpm = {k: v for k, v in schedule.scheduler_config.items() if k in _DDPM_KEYS}  # another VP scheduler's too
    scheduler = DDPMScheduler.from_config({**ddpm, "prediction_type": model.prediction.kind})
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
