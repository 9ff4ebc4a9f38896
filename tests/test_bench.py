"""The benchmarks' own arithmetic: the paper-scale cost model counts what the engine does
(checked against the engine's call counter), its predictions are count x cost, the
memory probe sees a known allocation, and the fused training path trains the same
network as the per-tensor loops to round-off."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffsens_cli.builders import solver_settings
from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.influence import influence
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.pipelines import bench_paper_scale as bench
from diffsens_cli.pipelines.influence import influence_settings
from diffsens_cli.pipelines.shared.timing import peak_memory

SIZES = {"digits": 1797, "celeba": 162770, "mnist": 60000, "tmnist": 29900, "cifar10": 50000}


def _compose(experiment: str, *overrides: str):
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}", *overrides])


def _items(work: list[bench.Work]) -> dict[tuple[str, str, int], int]:
    out: dict[tuple[str, str, int], int] = {}
    for w in work:
        out[(w.stage, w.op, w.k)] = out.get((w.stage, w.op, w.k), 0) + w.items
    return out


def test_the_main_jobs_workload_is_its_steps_and_evaluations():
    """digits_typography by hand: 40 epochs of 1797 digits at batch 128 (562 steps); 256
    samples x 200 evaluations (Heun, 100 steps) carrying psi and 4 probes; fine-tuning one
    epoch of the 2000 typeset digits (16 steps)."""
    work = _items(bench.workload(_compose("digits_typography"), SIZES, 64))
    assert work == {("train_base", "train", 0): 562 * 128, ("sensitivity", "jvp", 5): 256 * 200,
                    ("train_retrain", "train", 0): 562 * 128, ("samples_retrain", "eval", 0): 256 * 200,
                    ("train_finetune", "train", 0): 16 * 128, ("samples_finetune", "eval", 0): 256 * 200}


def test_celeba_oldman_counts_the_paper_settings():
    """App. F.2: 1000 epochs of 10k images at batch 512, 1000 samples x 999 Euler steps with
    psi and one probe, 200 epochs of the 495 old men."""
    work = _items(bench.workload(_compose("celeba_oldman"), SIZES, 3 * 64 * 64))
    assert work[("train_base", "train", 0)] == math.ceil(1000 * 10000 / 512) * 512
    assert work[("sensitivity", "jvp", 2)] == 1000 * 999
    assert work[("train_finetune", "train", 0)] == math.ceil(200 * 495 / 512) * 512


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("projections", [4, 10])
def test_influence_workload_is_what_the_engine_calls(projections):
    """The cost model's network calls and the vectors they carry equal the engine's own
    count (``CountingModel``) for the sketch, with and without the randomised SVD (m < d);
    the shown images' tangents are the pipeline's, not the engine's."""
    cfg = _compose("influence_closed_form", f"influence.projections={projections}", "influence.rank=2",
                   "influence.oversample=1", "solver.num_steps=7", "solver.density=ccov", "solver.hutchinson_samples=2",
                   "solver.probe=rademacher", "solver.integrator=heun")
    d, n_points, samples = 10, 30, 3
    g = torch.Generator().manual_seed(0)
    points = torch.randn(n_points, d, generator=g)
    model = MixtureScore(GaussianMixture.empirical(points), VPLinear())
    z0 = model.sample_base(samples, (d,), torch.tensor(0.0), g)
    settings = solver_settings(OmegaConf.merge(cfg.solver, {"progress": False}))
    res = influence(model, settings, points, z0, influence_settings(cfg), [None])
    work = [w for w in bench._influence_work(cfg, samples, n_points, d) if "shown" not in w.stage]
    calls = sum(w.items // samples for w in work)
    vectors = sum(w.items // samples * w.k for w in work)
    assert (res.network_calls, res.network_vectors) == (calls, vectors)
    assert res.exact == (projections >= d)


def test_prediction_is_count_times_cost_per_item():
    measured = {"seconds_per_item": {"eval": 0.5, "train": 2.0}, "jvp_fit": {"a": 1.0, "b": 0.25},
                "vjp_fit": {"a": 3.0, "b": 0.5}}
    work = [bench.Work("a", "eval", 10), bench.Work("a", "jvp", 4, 8), bench.Work("b", "vjp", 2, 6),
            bench.Work("c", "train", 3)]
    assert bench.predict(work, measured) == {"a": 10 * 0.5 + 4 * (1.0 + 0.25 * 8), "b": 2 * (3.0 + 0.5 * 6),
                                             "c": 3 * 2.0}


def test_linear_fit_recovers_a_line_and_one_count_is_proportional():
    assert np.allclose(bench.linear_fit([1, 4, 16], [1 + 2 * k for k in (1, 4, 16)]), (1.0, 2.0))
    assert bench.linear_fit([4], [8.0]) == (0.0, 2.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_peak_memory_sees_a_known_allocation():
    """100 MB allocated inside, after 800 MB freed before (which glibc would keep resident)."""
    freed = [torch.ones(50_000_000) for _ in range(4)]
    del freed
    for _ in range(2):
        peak = peak_memory(torch.device("cpu"), lambda: torch.ones(25_000_000).sum())
        assert 95e6 < peak < 110e6
