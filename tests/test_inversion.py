"""PF-ODE inversion (``Integrator.invert``): on a closed-form model, the starting noise
recovered from a sample's end point converges to the true one at the step rule's order,
and the forward pass from it reproduces the sample."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import solver_settings_with

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear

F64 = torch.float64


@pytest.fixture(scope="module")
def problem() -> tuple[MixtureScore, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rho = GaussianMixture(torch.randn(3, 4, generator=g, dtype=F64), torch.tensor([0.3, 0.5, 0.4], dtype=F64),
                          torch.tensor([1.0, 2.0, 1.5], dtype=F64))
    model = MixtureScore(rho, VPLinear())
    z0 = model.sample_base(8, (4,), torch.tensor(0.0, dtype=F64), torch.Generator().manual_seed(1))
    return model, z0


@pytest.mark.parametrize("integrator, order", [("euler", 1), ("heun", 2)])
def test_inversion_converges_to_the_true_start_at_the_rules_order(problem, integrator, order):
    model, z0 = problem
    fine = solver_settings_with(integrator="heun", num_steps=2000, t_min=1e-2, density="closed_form", progress=False)
    x = Integrator(model, fine).run(z0).samples  # the exact end point, to far below the errors measured
    errors = []
    for n in (50, 100, 200):
        s = solver_settings_with(integrator=integrator, num_steps=n, t_min=1e-2, density="closed_form",
                                 progress=False)
        errors.append((Integrator(model, s).invert(x) - z0).norm() / z0.norm())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)
    assert errors[-1] < (5e-3 if order == 1 else 5e-4)  # measured: 3.4e-3 and 2.2e-4 at 200 steps


def test_the_forward_pass_from_the_inverted_start_reproduces_the_sample(problem):
    model, z0 = problem
    s = solver_settings_with(integrator="heun", num_steps=100, t_min=1e-2, density="closed_form", progress=False)
    integrator = Integrator(model, s)
    x = integrator.run(z0).samples
    again = integrator.run(integrator.invert(x)).samples
    assert (again - x).norm() / x.norm() < 1e-4


def test_inverting_in_chunks_changes_nothing(problem):
    model, z0 = problem
    s = solver_settings_with(integrator="heun", num_steps=20, t_min=1e-2, density="closed_form", progress=False)
    x = Integrator(model, s).run(z0).samples
    whole = Integrator(model, s).invert(x)
    chunked = Integrator(model, replace(s, batch_size=3)).invert(x)  # 3 + 3 + 2 rows
    assert torch.equal(whole, chunked)


def test_an_sde_cannot_be_inverted(problem):
    model, z0 = problem
    s = solver_settings_with(method="sde", num_steps=10, density="closed_form", progress=False)
    with pytest.raises(ValueError, match="inversion follows the probability-flow ODE"):
        Integrator(model, s).invert(z0)
