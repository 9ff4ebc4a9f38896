"""Step rules for the augmented state ``(z, log rho, psi)`` (docs/design.md section 5).

Small functions in the style of k-diffusion's samplers: each advances a ``State`` from
grid point ``k`` to ``k + 1`` of a ``Grid`` given ``field(k, state)``, the time
derivative of every part of the state at grid point ``k``.  Everything else (chunks,
memory, random numbers, replicas) belongs to the integrator that calls them.  Because
every part of the state is advanced by the same rule, the psi update is the exact
eta-derivative of the discrete z update (the fused scheme of Algorithm 1).

Each rule comes with its adjoint, the exact transpose of its linearised step, which the
reverse pass of ``core.influence`` runs backwards along a recorded path: a ``StepRule``
holds both, and ``STEP_RULES`` is the one registry a new sampler joins (the test of
every registered rule runs it forward, as a tangent and as an adjoint against finite
differences).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
Step = Callable[[Field, int, Grid, State, torch.Tensor | None], State]  # the last: the SDE's noise on z


def _mean(d1: State, d2: State) -> State:
    return State(*(None if a is None else (a + b) / 2 for a, b in zip(d1, d2, strict=True)))


def euler(field: Field, k: int, grid: Grid, state: State, noise: torch.Tensor | None = None) -> State:
    """Forward Euler (first order; the paper's App. F.2 integrator)."""
    return state.add(grid.h(k), field(k, state))


def heun(field: Field, k: int, grid: Grid, state: State, noise: torch.Tensor | None = None) -> State:
    """Heun's method, the explicit trapezoidal rule (second order): two field evaluations,
    at ``z_k`` and at the Euler predictor (grid point ``k + 1``)."""
    d1 = field(k, state)
    d2 = field(k + 1, state.add(grid.h(k), d1))
    return state.add(grid.h(k), _mean(d1, d2))


def euler_maruyama(field: Field, k: int, grid: Grid, state: State, noise: torch.Tensor | None = None) -> State:
    """Euler-Maruyama for the reverse SDE: the Euler drift step plus the step's noise
    ``g sqrt(h) xi`` on ``z`` (it does not depend on the state, so psi and log rho take none)."""
    out = euler(field, k, grid, state)
    return out._replace(z=out.z + noise)


# -- adjoints: the transposes of the linearised steps, for the reverse pass of core.influence.
# ``pull(j, lam, scale)`` stands for the step's j-th field evaluation (in the order the step
# made them): it adds ``scale <forcing_j, lam>`` to the scores and returns ``J_j^T lam``, the
# transposed Jacobian of the psi field there.  An adjoint maps the cotangent after the step
# to the one before it.
Pull = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def euler_adjoint(pull: Pull, h: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """psi' = psi + h d(psi): lam = lam' + h J^T lam'."""
    return lam + h * pull(0, lam, h)


def heun_adjoint(pull: Pull, h: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """psi' = psi + h/2 (d1 + d2), d2 at the predictor psi + h d1: the stages in reverse."""
    mu = pull(1, lam, h / 2)
    return lam + h / 2 * (mu + pull(0, lam + h * mu, h / 2))


@dataclass(frozen=True)
class StepRule:
    """A sampler as the engine uses it: the step, the number of field evaluations it makes
    (what a ``Tape`` records per step), its adjoint, and whether it takes the reverse SDE's
    noise (the integrator draws it, keyed by sample and step)."""

    name: str
    step: Step
    evaluations: int
    adjoint: Callable[[Pull, torch.Tensor, torch.Tensor], torch.Tensor]
    stochastic: bool = False


# Every rule, by the solver settings that select it: (solver.method, solver.integrator).
# A new sampler is a step function, its adjoint and one entry here.
STEP_RULES: dict[tuple[str, str], StepRule] = {
    ("ode", "euler"): StepRule("euler", euler, 1, euler_adjoint),
    ("ode", "heun"): StepRule("heun", heun, 2, heun_adjoint),
    ("sde", "euler"): StepRule("euler_maruyama", euler_maruyama, 1, euler_adjoint, stochastic=True),
}


def step_rule(method: str, integrator: str) -> StepRule:
    """The rule of ``solver.method`` and ``solver.integrator`` (a KeyError naming both if none)."""
    try:
        return STEP_RULES[method, integrator]
    except KeyError:
        raise KeyError(f"no step rule for method {method!r} with integrator {integrator!r}") from None
