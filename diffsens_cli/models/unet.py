"""Neural score models from the ``model`` config group: a diffusers ``UNet2DModel``
(paper App. F.2), the Fourier-feature MLP, or a model the user brings (``pretrained``).

``build_unet`` makes the bare UNet (default fused kernels: for training);
``build_network_model`` makes the score model, by default with the forward-mode AD
fixes of ``network.enable_forward_ad`` installed (for sensitivities).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from diffusers import UNet2DModel
from omegaconf import DictConfig

from diffsens_cli.core.schedule import Schedule
from diffsens_cli.errors import ConfigError, listed, number, one_of, plain, positive_whole, require, whole
from diffsens_cli.models import NETWORK_KINDS
from diffsens_cli.models.network import PREDICTION_TYPES, FourierMLP, NetworkScore, UNetAdapter, enable_forward_ad
from diffsens_cli.models.pretrained import LAYOUT, check_pretrained, class_label, load_pretrained


def _block_type(value: object, key: str) -> str:
    require(isinstance(value, str), key, f"must be a diffusers block type name, got {value!r}")
    return value


def _unet_settings(cfg: dict, event_shape: tuple[int, ...]) -> dict:
    """The checked ``UNet2DModel`` arguments of a ``model`` config of kind unet, for ``event_shape``."""
    require(len(event_shape) == 3, "model.kind",
            f"a UNet needs image data (channels, height, width), the dataset gives samples of shape {event_shape}")
    channels, height, width = event_shape
    blocks = listed(cfg["block_out_channels"], "model.block_out_channels", positive_whole)
    levels = len(blocks)
    types = {key: listed(cfg[key], f"model.{key}", _block_type) for key in ("down_block_types", "up_block_types")}
    for key, names in types.items():
        require(len(names) == levels, f"model.{key}",
                f"needs one block type per entry of model.block_out_channels ({levels}), got {len(names)}")
    factor = 2 ** (levels - 1)
    require(height % factor == 0 and width % factor == 0, "model.block_out_channels",
            f"{levels} levels need dataset.image_size divisible by 2^{levels - 1} = {factor}; got {height}x{width}")
    divisors = {key: positive_whole(cfg[key], f"model.{key}") for key in ("norm_num_groups", "attention_head_dim")}
    for key, d in divisors.items():
        require(all(c % d == 0 for c in blocks), f"model.{key}",
                f"must divide every entry of model.block_out_channels {blocks}, got {d}")
    dropout = number(cfg.get("dropout", 0.0), "model.dropout")
    require(0 <= dropout < 1, "model.dropout", f"must be in [0, 1), got {dropout}")
    layers = positive_whole(cfg["layers_per_block"], "model.layers_per_block")
    return dict(sample_size=height if height == width else (height, width), in_channels=channels,
                out_channels=channels, layers_per_block=layers,
                block_out_channels=tuple(blocks), down_block_types=tuple(types["down_block_types"]),
                up_block_types=tuple(types["up_block_types"]), dropout=dropout, **divisors)


def build_unet(cfg_model: DictConfig | Mapping, event_shape: tuple[int, ...]) -> UNet2DModel:
    """A freshly initialised ``UNet2DModel`` (seeded by ``model.seed``) for images of
    ``event_shape = (channels, height, width)``; every bad value is a one-line ConfigError."""
    cfg = plain(cfg_model)
    settings = _unet_settings(cfg, event_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(whole(cfg.get("seed", 0), "model.seed"))
        try:
            return UNet2DModel(**settings)
        except ValueError as e:  # unknown block types
            raise ConfigError("model", str(e).splitlines()[0]) from None


def _mlp_settings(cfg: dict) -> dict:
    """The checked ``FourierMLP`` sizes of a ``model`` config of kind mlp."""
    scale = number(cfg["fourier_scale"], "model.fourier_scale")
    require(scale > 0, "model.fourier_scale", f"must be > 0, got {scale}")
    return dict(hidden=positive_whole(cfg["hidden"], "model.hidden"), depth=positive_whole(cfg["depth"], "model.depth"),
                num_frequencies=positive_whole(cfg["num_frequencies"], "model.num_frequencies"), fourier_scale=scale)


def bench_network(spec: object, key: str, fields: tuple[str, ...]) -> tuple[dict, tuple[int, int, int]]:
    """A benchmark's network entry ``key`` (a mapping with ``model``, ``shape`` [C, H, W] and
    ``fields``), checked: its model config and its image shape."""
    require(isinstance(spec, dict) and {"model", "shape", *fields} <= set(spec), key,
            f"needs model, shape and {', '.join(fields)}, got {spec!r}")
    shape = tuple(listed(spec["shape"], f"{key}.shape", whole))
    require(len(shape) == 3 and min(shape) >= 1, f"{key}.shape", f"must be [C, H, W], got {list(shape)}")
    check_network(spec["model"], shape)
    return spec["model"], shape


def check_network(cfg_model: DictConfig | Mapping, event_shape: tuple[int, ...]) -> None:
    """Check a ``model`` config of kind unet, mlp or pretrained for samples of ``event_shape``
    without building or loading the network (run before a run directory exists)."""
    cfg = plain(cfg_model)
    kind = one_of(cfg["kind"], NETWORK_KINDS, "model.kind")
    if kind == "pretrained":
        root, net_config, _, _ = check_pretrained(_pretrained_path(cfg))
        _check_event_shape(net_config, event_shape, cfg["path"])
        class_label(net_config, cfg.get("class_label"), root)
        return
    whole(cfg.get("seed", 0), "model.seed")
    one_of(cfg.get("prediction", "epsilon"), PREDICTION_TYPES, "model.prediction")
    if kind == "mlp":
        _mlp_settings(cfg)
    else:
        _unet_settings(cfg, event_shape)


def _pretrained_path(cfg: dict) -> str:
    path = cfg.get("path")
    require(isinstance(path, str) and path not in ("", "???"), "model.path", f"must be set; {LAYOUT}")
    return path


def build_network_model(cfg_model: DictConfig | Mapping, event_shape: tuple[int, ...], schedule: Schedule,
                        dtype: torch.dtype = torch.float32, forward_ad: bool = True) -> NetworkScore:
    """The neural score model of a ``model`` config of kind ``unet``, ``mlp`` (on
    ``prod(event_shape)`` coordinates) or ``pretrained`` (``model.path``; its own
    scheduler config gives the schedule and prediction type, so ``schedule`` is unused
    there).  ``forward_ad`` installs the JVP fixes (``network.enable_forward_ad``)."""
    cfg = plain(cfg_model)
    kind = one_of(cfg["kind"], NETWORK_KINDS, "model.kind")
    if kind == "pretrained":
        model = load_pretrained(_pretrained_path(cfg), dtype=dtype, forward_ad=forward_ad,
                                label=cfg.get("class_label"))
        net = model.net.model if isinstance(model.net, UNetAdapter) else model.net
        _check_event_shape(net.config, event_shape, cfg["path"])
        return model
    if kind == "mlp":
        seed = whole(cfg["seed"], "model.seed")
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(seed)
            net = FourierMLP(math.prod(event_shape), **_mlp_settings(cfg),
                             num_train_timesteps=schedule.num_train_timesteps, seed=seed)
    else:
        net = UNetAdapter(build_unet(cfg, event_shape))
    net = net.to(dtype).eval()  # a score model is deterministic (dropout off); a trainer calls .train()
    if forward_ad:
        enable_forward_ad(net)
    return NetworkScore(net, schedule, cfg.get("prediction", "epsilon"))


def _check_event_shape(config: Mapping, event_shape: tuple[int, ...], path: str) -> None:
    """A saved network (its config: unet/config.json, or the loaded network's) must take the data set's samples."""
    if "dim" in config:  # a FourierMLP
        ok, takes = config["dim"] == math.prod(event_shape), f"{config['dim']} coordinates"
    else:
        size = config.get("sample_size")  # None: any size
        side = (tuple(size) if isinstance(size, (list, tuple)) else (size, size)) if size else tuple(event_shape[1:])
        want = (config.get("in_channels"), *side)
        ok, takes = len(event_shape) == 3 and tuple(event_shape) == want, f"images of shape {want}"
    require(ok, "model.path", f"the model at {path} takes {takes}, but the dataset gives samples of shape "
            f"{tuple(event_shape)} (see dataset.image_size)")
