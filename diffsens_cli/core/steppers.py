"""Step rules for the augmented state ``(z, log rho, psi)`` (docs/design.md section 5).

Small functions in the style of k-diffusion's samplers: each advances a ``State`` from
grid point ``k`` to ``k + 1`` of a ``Grid`` given ``field(k, state)``, the time
derivative of every part of the state at grid point ``k``.  Everything else (chunks,
memory, random numbers, replicas) belongs to the integrator that calls them.  Because
every part of the state is advanced by the same rule, the psi update is the exact
eta-derivative of the discrete z update (the fused scheme of Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from diffsens_cli.core.schedule import Coefficients


class State(NamedTuple):
    """The integrated state: sample ``z`` [B, *event], log-density [B] and sensitivities
    ``psi`` [K, B, *event] (each may be None when not integrated)."""

    z: torch.Tensor
    logp: torch.Tensor | None
    psi: torch.Tensor | None

    def add(self, h: torch.Tensor | float, d: State) -> State:
        """``self + h d``, part by part."""
        return State(*(None if x is None else x + h * dx for x, dx in zip(self, d, strict=True)))


class Grid(NamedTuple):
    """The time grid: ``times`` [n + 1] and the schedule's coefficients at each of them."""

    times: torch.Tensor
    co: Coefficients

    def h(self, k: int) -> torch.Tensor:
        return self.times[k + 1] - self.times[k]


Field = Callable[[int, State], State]


def _mean(d1: State, d2: State) -> State:
    return State(*(None if a is None else (a + b) / 2 for a, b in zip(d1, d2, strict=True)))


def euler(field: Field, k: int, grid: Grid, state: State) -> State:
    """Forward Euler (first order; the paper's App. F.2 integrator)."""
    return state.add(grid.h(k), field(k, state))


def heun(field: Field, k: int, grid: Grid, state: State) -> State:
    """Heun's method, the explicit trapezoidal rule (second order): two field evaluations."""
    d1 = field(k, state)
    d2 = field(k + 1, state.add(grid.h(k), d1))
    return state.add(grid.h(k), _mean(d1, d2))


def euler_maruyama(field: Field, k: int, grid: Grid, state: State, diffusion: torch.Tensor,
                   xi: torch.Tensor) -> State:
    """Euler-Maruyama for the reverse SDE: the Euler drift step plus ``g sqrt(h) xi`` on
    ``z`` (the noise does not depend on the state, so psi and log rho take none)."""
    out = euler(field, k, grid, state)
    return out._replace(z=out.z + diffusion * grid.h(k).sqrt() * xi)


STEPPERS: dict[str, Callable[[Field, int, Grid, State], State]] = {"euler": euler, "heun": heun}
ODE_ONLY = ("heun",)  # the SDE is integrated with Euler-Maruyama
