"""The score-to-velocity map (docs/design.md section 2): one place for the ODE velocity, the
SDE drift and their derivatives.

Both are ``a_t z + k c_t s_t(z)`` with score gain ``k = 1`` (PF-ODE velocity) or
``k = 2`` (reverse-SDE drift, diffusion ``sqrt(2 c_t)``); so ``J_z = a_t I + k c_t J_z s``
and ``d/deta = k c_t g_t``.
"""

from __future__ import annotations

import torch

from diffsens_cli.core.schedule import Coefficients

SCORE_GAIN = {"ode": 1.0, "sde": 2.0}


def drift(co: Coefficients, z: torch.Tensor, score: torch.Tensor, gain: float) -> torch.Tensor:
    """Velocity (gain 1) or SDE drift (gain 2)."""
    return co.a * z + gain * co.c * score


def drift_jvp(co: Coefficients, v: torch.Tensor, score_jvp: torch.Tensor, gain: float) -> torch.Tensor:
    """``J_z drift v`` from ``J_z s v``."""
    return co.a * v + gain * co.c * score_jvp


def velocity_divergence(co: Coefficients, dim: int, score_trace: torch.Tensor) -> torch.Tensor:
    """``div v_t = d a_t + c_t tr J_z s`` (the CCoV integrand)."""
    return dim * co.a + co.c * score_trace


def diffusion(co: Coefficients) -> torch.Tensor:
    """Diffusion coefficient of the reverse SDE."""
    return (2 * co.c).sqrt()
