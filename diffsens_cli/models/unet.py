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
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.core.schedule import Schedule
from diffsens_cli.errors import ConfigError, one_of, require
from diffsens_cli.models.network import FourierMLP, NetworkScore, UNetAdapter, enable_forward_ad
from diffsens_cli.models.pretrained import LAYOUT, load_pretrained

NETWORK_KINDS = ("unet", "mlp", "pretrained")


def _plain(cfg: DictConfig | Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_unet(cfg_model: DictConfig | Mapping, event_shape: tuple[int, ...]) -> UNet2DModel:
    """A freshly initialised ``UNet2DModel`` (seeded by ``model.seed``) for images of
    ``event_shape = (channels, height, width)``; every bad value is a one-line ConfigError."""
    cfg = _plain(cfg_model)
    require(len(event_shape) == 3, "model.kind",
            f"a UNet needs image data (channels, height, width), the dataset gives samples of shape {event_shape}")
    channels, height, width = event_shape
    blocks = [int(c) for c in cfg["block_out_channels"]]
    levels = len(blocks)
    require(levels >= 1, "model.block_out_channels", "needs at least one level")
    for key in ("down_block_types", "up_block_types"):
        require(len(cfg[key]) == levels, f"model.{key}",
                f"needs one block type per entry of model.block_out_channels ({levels}), got {len(cfg[key])}")
    factor = 2 ** (levels - 1)
    require(height % factor == 0 and width % factor == 0, "model.block_out_channels",
            f"{levels} levels need dataset.image_size divisible by 2^{levels - 1} = {factor}; got {height}x{width}")
    for key in ("norm_num_groups", "attention_head_dim"):
        require(all(c % int(cfg[key]) == 0 for c in blocks), f"model.{key}",
                f"must divide every entry of model.block_out_channels {blocks}, got {cfg[key]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        try:
            return UNet2DModel(
                sample_size=height if height == width else (height, width), in_channels=channels,
                out_channels=channels, layers_per_block=int(cfg["layers_per_block"]),
                block_out_channels=tuple(blocks), down_block_types=tuple(cfg["down_block_types"]),
                up_block_types=tuple(cfg["up_block_types"]), norm_num_groups=int(cfg["norm_num_groups"]),
                attention_head_dim=int(cfg["attention_head_dim"]), dropout=float(cfg.get("dropout", 0.0)))
        except ValueError as e:  # unknown block types
            raise ConfigError("model", str(e).splitlines()[0]) from None


def build_network_model(cfg_model: DictConfig | Mapping, event_shape: tuple[int, ...], schedule: Schedule,
                        dtype: torch.dtype = torch.float32, forward_ad: bool = True) -> NetworkScore:
    """The neural score model of a ``model`` config of kind ``unet``, ``mlp`` (on
    ``prod(event_shape)`` coordinates) or ``pretrained`` (``model.path``; its own
    scheduler config gives the schedule and prediction type, so ``schedule`` is unused
    there).  ``forward_ad`` installs the JVP fixes (``network.enable_forward_ad``)."""
    cfg = _plain(cfg_model)
    kind = one_of(cfg["kind"], NETWORK_KINDS, "model.kind")
    if kind == "pretrained":
        require(cfg.get("path") not in (None, "", "???"), "model.path", f"must be set; {LAYOUT}")
        model = load_pretrained(cfg["path"], dtype=dtype, forward_ad=forward_ad)
        _check_event_shape(model, event_shape, cfg["path"])
        return model
    if kind == "mlp":
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(int(cfg["seed"]))
            net = FourierMLP(math.prod(event_shape), hidden=int(cfg["hidden"]), depth=int(cfg["depth"]),
                             num_frequencies=int(cfg["num_frequencies"]), fourier_scale=float(cfg["fourier_scale"]),
                             num_train_timesteps=schedule.num_train_timesteps, seed=int(cfg["seed"]))
    else:
        net = UNetAdapter(build_unet(cfg, event_shape))
    net = net.to(dtype).eval()  # a score model is deterministic (dropout off); a trainer calls .train()
    if forward_ad:
        enable_forward_ad(net)
    return NetworkScore(net, schedule, cfg.get("prediction", "epsilon"))


def _check_event_shape(model: NetworkScore, event_shape: tuple[int, ...], path: str) -> None:
    """A loaded network must take the data set's samples."""
    net = model.net.model if isinstance(model.net, UNetAdapter) else model.net
    if isinstance(net, FourierMLP):
        ok, takes = net.config.dim == math.prod(event_shape), f"{net.config.dim} coordinates"
    else:
        size = net.config.sample_size  # None: any size
        side = (tuple(size) if isinstance(size, (list, tuple)) else (size, size)) if size else tuple(event_shape[1:])
        want = (net.config.in_channels, *side)
        ok, takes = len(event_shape) == 3 and tuple(event_shape) == want, f"images of shape {want}"
    require(ok, "model.path", f"the model at {path} takes {takes}, but the dataset gives samples of shape "
            f"{tuple(event_shape)} (see dataset.image_size)")
