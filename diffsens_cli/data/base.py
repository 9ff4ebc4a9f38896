"""The image-set container and the steps every loader shares: checked config access,
the seeded ``limit`` draw, the [-1, 1] scaling and resizing.

All images are float32 [N, C, H, W] in [-1, 1] with the background at -1 (ink bright,
as in MNIST), so that data sets of one shape can stand in for each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from diffsens_cli.errors import ConfigError, one_of, require, whole


@dataclass
class ImageSet:
    """Images with their class labels, (CelebA) binary attributes and (image folders) file
    names relative to the folder, where the set has them."""

    images: torch.Tensor
    labels: torch.Tensor | None
    attributes: dict[str, torch.Tensor] | None
    name: str
    names: list[str] | None = None

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The images at ``index`` (integer positions or a bool mask), with their labels,
        attributes and names."""
        positions = torch.arange(len(self))[index].tolist() if self.names is not None else []
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            attributes=None if self.attributes is None else {k: v[index] for k, v in self.attributes.items()},
            name=self.name,
            names=None if self.names is None else [self.names[i] for i in positions],
        )

    def __len__(self) -> int:
        return self.images.shape[0]


class Spec:
    """A data-set config as a plain dict, read through checks whose errors name ``<key>.<name>``."""

    def __init__(self, cfg: DictConfig | dict, key: str):
        self.values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) \
            else dict(cfg)
        self.key = key

    def name(self, field: str) -> str:
        return f"{self.key}.{field}"

    def get(self, field: str, default: Any = None) -> Any:
        return self.values.get(field, default)

    def positive_int(self, field: str, default: int | None = None, optional: bool = True) -> int | None:
        """``field`` as an int >= 1; None when unset and ``optional``."""
        return whole(self.values.get(field, default), self.name(field), null=optional, at_least=1)

    def choice(self, field: str, allowed: list[str], default: str | None) -> str:
        return one_of(self.values.get(field, default), allowed, self.name(field))

    def seed(self) -> int:
        return whole(self.values.get("seed", 0), self.name("seed"))

    def root(self, layout: str, get: str) -> Path:
        """The ``root`` folder of a published data set; ``layout`` says what it should hold,
        ``get`` where a user without it downloads it."""
        root = self.values.get("root")
        require(root is not None, self.name("root"), f"is null; set it to the folder holding {layout}")
        path = Path(str(root)).expanduser()
        require(path.is_dir(), self.name("root"), f"{path} is not a folder; expected one holding {layout}. "
                f"Download {get}, unpack it there, or set {self.name('root')}=PATH")
        return path

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(self.name(field), message)


def at_side(cfg: dict[str, Any], side: int) -> dict[str, Any]:
    """A data-set config read at image side ``side`` unless it sets its own ``image_size``
    (what is compared with rho's samples, S or queried images, takes rho's side)."""
    return cfg if cfg.get("image_size") is not None else {**cfg, "image_size": side}


def draw(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """Sorted positions of ``k`` of ``n`` items drawn at random with ``seed``; None when ``k`` keeps all."""
    if k is None or k >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 pixels to float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Square images of side ``size`` (antialiased bilinear), unchanged when ``size`` is None or already met."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(-1.0, 1.0)
