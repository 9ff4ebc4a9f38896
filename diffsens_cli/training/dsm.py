"""Denoising score matching in the network's own parametrisation.

A clean batch ``x0`` is noised to ``z = alpha_t x0 + sigma_t eps`` at diffusion times
``tau ~ U[t_min, 1]`` (paper time ``t = 1 - tau``), and the network is regressed on the
target of its prediction type (noise, clean sample or v) at its own timestep.
"""

from __future__ import annotations

import torch
from torch import nn

from diffsens_cli.core.schedule import Schedule
from diffsens_cli.models.network import Prediction


def dsm_loss(net: nn.Module, schedule: Schedule, prediction: Prediction, x0: torch.Tensor, t_min: float,
             generator: torch.Generator) -> torch.Tensor:
    """Mean squared error of ``net`` on one noised batch (mean over batch and coordinates)."""
    b = x0.shape[0]
    tau = t_min + (1 - t_min) * torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
    t = 1 - tau
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    shape = (b, *([1] * (x0.ndim - 1)))
    alpha, sigma = schedule.alpha(t).view(shape), schedule.sigma(t).view(shape)
    out = net(alpha * x0 + sigma * eps, schedule.model_time(t))
    return (out - prediction.target(x0, eps, alpha, sigma)).square().mean()
