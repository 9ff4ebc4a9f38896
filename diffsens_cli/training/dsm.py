"""Denoising score matching in the network's own parametrisation, and the diffusion-Fisher
paper's trace matching.

A clean batch ``x0`` is noised to ``z = alpha_t x0 + sigma_t eps`` at diffusion times
``tau ~ U[t_min, 1]`` (paper time ``t = 1 - tau``), and the network is regressed on the
target of its prediction type (noise, clean sample or v) at its own timestep, or, for a
second-moment head, on ``x0^2``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffsens_cli.core.schedule import Schedule
from diffsens_cli.models.network import Prediction


def noised(schedule: Schedule, x0: torch.Tensor, t_min: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch noised at diffusion times ``tau ~ U[t_min, 1]``: ``z = alpha x0 + sigma eps``, the
    network's timesteps, ``eps``, and ``alpha``, ``sigma`` shaped to broadcast against ``x0``."""
    b = x0.shape[0]
    tau = t_min + (1 - t_min) * torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
    t = 1 - tau
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    shape = (b, *([1] * (x0.ndim - 1)))
    alpha, sigma = schedule.alpha(t).view(shape), schedule.sigma(t).view(shape)
    return alpha * x0 + sigma * eps, schedule.model_time(t), eps, alpha, sigma


def dsm_loss(net: nn.Module, schedule: Schedule, prediction: Prediction, x0: torch.Tensor, t_min: float,
             generator: torch.Generator) -> torch.Tensor:
    """Mean squared error of ``net`` on one noised batch (mean over batch and coordinates)."""
    z, timestep, eps, alpha, sigma = noised(schedule, x0, t_min, generator)
    return (net(z, timestep) - prediction.target(x0, eps, alpha, sigma)).square().mean()


def second_moment_loss(net: nn.Module, schedule: Schedule, prediction: Prediction, x0: torch.Tensor, t_min: float,
                       generator: torch.Generator) -> torch.Tensor:
    """The diffusion-Fisher paper's trace matching (its Algorithm 1), per coordinate: ``net``
    regresses ``x0_i^2`` on the noised batch, so its outputs estimate ``E[x0_i^2 | z]`` and their
    mean the paper's ``E[|x0|^2 / d | z]``.  ``prediction`` is not used (same signature as
    ``dsm_loss``, so a ``Trainer`` takes either)."""
    z, timestep, _, _, _ = noised(schedule, x0, t_min, generator)
    return (net(z, timestep) - x0.square()).square().mean()
