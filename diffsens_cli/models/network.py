"""Neural score models: a network of ``(z, model time)`` turned into a score."""

from __future__ import annotations

import math

import torch
from torch import nn

from diffsens_cli.core.schedule import Schedule
from diffsens_cli.models.base import ScoreModel


class NetworkScore(ScoreModel):
    """Wraps ``net(z, timestep)``; ``prediction='epsilon'`` gives ``s = -eps_hat / sigma_t``."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str = "epsilon"):
        if prediction not in ("epsilon", "score"):
            raise ValueError(f"prediction must be 'epsilon' or 'score', got {prediction!r}")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def score(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(z, self.schedule.model_time(t).expand(z.shape[0]))
        return -out / self.schedule.sigma(t) if self.prediction == "epsilon" else out


class FourierMLP(nn.Module):
    """MLP on random Fourier features of ``(z, time)`` (paper App. F.1.2: 2 x 512, SiLU,
    128 frequencies of scale 2)."""

    def __init__(self, dim: int, hidden: int = 512, depth: int = 2, num_frequencies: int = 128,
                 fourier_scale: float = 2.0, num_train_timesteps: int = 1000, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", fourier_scale * torch.randn(dim + 1, num_frequencies, generator=g))
        self.time_scale = 1.0 / num_train_timesteps
        layers: list[nn.Module] = []
        width = 2 * num_frequencies
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z.flatten(1), (timestep * self.time_scale)[:, None].to(z.dtype)], 1)
        proj = 2 * math.pi * x @ self.freqs
        return self.body(torch.cat([proj.sin(), proj.cos()], 1)).view_as(z)
