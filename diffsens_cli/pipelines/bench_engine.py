"""Engine cost benchmark: is a sensitivity run about as cheap as sampling + likelihood,
and what does each extra sensitivity tangent cost?

For each score model (the Fourier MLP of the synthetic data, and UNets of the image
experiments' shapes, ``bench.unets``), times side by side in one process, on one batch
and step count: (a) PF-ODE sampling, (b) sampling + CCoV log-density with h Hutchinson
probes, (c) the full sensitivity run (b plus the sensitivity tangent and Eq. 1 with
nu).  Runs are interleaved and repeated, and the median of each is kept.  The floor of
(c)/(b) is the marginal cost of one more tangent in the same vmapped JVP, measured on
its own; ``tangent_cost`` is the time of one score evaluation with K tangents (one
vmapped JVP) relative to one forward pass, for each K of ``bench.tangents``.  The
networks are freshly initialised: their cost does not depend on their weights.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from omegaconf import DictConfig

from diffsens_cli.builders import Components, build_schedule
from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.integrate import Integrator, SolverSettings
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.errors import listed, plain, positive_whole, require, whole
from diffsens_cli.pipelines.shared.timing import median_seconds, timer
from diffsens_cli.rundir import RunDir


def _unets(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """``bench.unets``: name -> model config, event shape and batch size (checked)."""
    from diffsens_cli.models.unet import bench_network

    out = {}
    for name, spec in (plain(cfg.bench.unets) or {}).items():
        key = f"bench.unets.{name}"
        model, shape = bench_network(spec, key, ("batch_size",))
        out[name] = {"model": model, "shape": shape,
                     "batch_size": positive_whole(spec["batch_size"], f"{key}.batch_size")}
    return out


def check(cfg: DictConfig) -> None:
    Components(cfg)
    for field in ("batch_size", "repeats"):
        positive_whole(cfg.bench[field], f"bench.{field}")
    tangents = listed(cfg.bench.tangents, "bench.tangents", whole)
    require(tangents and min(tangents) >= 1, "bench.tangents", f"must list counts >= 1, got {tangents}")
    _unets(cfg)


def measure(model: ScoreModel, z0: torch.Tensor, nu: GaussianMixture, solver: SolverSettings, repeats: int,
            tangents: list[int], gen: torch.Generator) -> dict[str, Any]:
    """The three modes, the one-tangent floor and the tangent-cost curve of ``model``."""
    dev, dt = z0.device, z0.dtype
    base = replace(solver, progress=False, density="ccov", divergence="hutchinson")
    h = base.hutchinson_samples
    modes = {
        "sampling": Integrator(model, base),
        "likelihood": Integrator(model, base, track_density=True),
        "sensitivity": Integrator(model, base, Perturbation([nu])),
    }
    timed = timer(dev)
    times: dict[str, list[float]] = {k: [] for k in modes}
    with torch.no_grad():
        for integ in modes.values():  # warm-up
            integ.run(z0)
        for _ in range(repeats):
            for name, integ in modes.items():
                times[name].append(timed(lambda: integ.run(z0)))

        t = torch.tensor(0.5, dtype=dt, device=dev)
        most = max(h + 1, *tangents)
        v = torch.randn(most, *z0.shape, generator=gen, dtype=dt, device=dev)

        def median_time(fn: Callable[[], object]) -> float:
            return median_seconds(dev, fn, 3 * repeats)

        forward = median_time(lambda: model.score(z0, t))
        jvp_times = {n: median_time(lambda: model.score_and_jvp(z0, t, v[:n])) for n in sorted({h, h + 1, *tangents})}

    med = {k: statistics.median(x) for k, x in times.items()}
    steps = base.grid()[2]
    return {
        "ratio_sensitivity_vs_likelihood": med["sensitivity"] / med["likelihood"],
        "ratio_sensitivity_vs_sampling": med["sensitivity"] / med["sampling"],
        "ratio_likelihood_vs_sampling": med["likelihood"] / med["sampling"],
        "floor_jvp_extra_tangent": jvp_times[h + 1] / jvp_times[h],
        "tangent_cost": {str(n): jvp_times[n] / forward for n in tangents},
        "ms_per_step": {k: 1e3 * x / steps for k, x in med.items()},
        "ms_forward": 1e3 * forward,
        "batch_size": z0.shape[0],
        "event_shape": list(z0.shape[1:]),
        "times_s": times,
    }


def run(cfg: DictConfig, run: RunDir) -> None:
    from diffsens_cli.models.unet import build_network_model

    check(cfg)
    comp = Components(cfg).on_device()
    bc = cfg.bench
    dev, dt = comp.device, comp.dtype
    gen = torch.Generator(dev).manual_seed(int(cfg.seed))
    repeats, tangents = int(bc.repeats), listed(bc.tangents, "bench.tangents", whole)
    t0 = torch.tensor(0.0, dtype=dt, device=dev)

    z0 = comp.model.sample_base(int(bc.batch_size), (comp.target.dim,), t0, gen)
    results = {"mlp": measure(comp.model, z0, comp.perturbation.measures[0], comp.solver, repeats, tangents, gen)}
    schedule = build_schedule(cfg.schedule)
    for name, spec in _unets(cfg).items():
        model = build_network_model(spec["model"], spec["shape"], schedule, dtype=dt)
        model.net.to(dev)
        z = model.sample_base(spec["batch_size"], spec["shape"], t0, gen)
        nu = GaussianMixture.empirical(torch.rand(100, *spec["shape"], generator=gen, device=dev, dtype=dt) * 2 - 1)
        results[f"unet_{name}"] = measure(model, z, nu, comp.solver, repeats, tangents, gen)
        print(f"bench_engine: {name} done")

    metrics = {"ratio_sensitivity_vs_likelihood": {k: r["ratio_sensitivity_vs_likelihood"] for k, r in results.items()},
               "tangent_cost": {k: r["tangent_cost"] for k, r in results.items()},
               "models": {k: {f: v for f, v in r.items() if f != "times_s"} for k, r in results.items()}}
    run.save_arrays("arrays", {f"{model}/times_{mode}": torch.tensor(x).numpy()
                               for model, r in results.items() for mode, x in r["times_s"].items()})
    run.write_summary(metrics, device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                      dtype=str(dt), num_steps=comp.solver.grid()[2], hutchinson_samples=comp.solver.hutchinson_samples,
                      repeats=repeats)
    for model, r in results.items():
        curve = ", ".join(f"K={k}: {c:.1f}x" for k, c in r["tangent_cost"].items())
        print(f"bench_engine {model} on {dev}: (c)/(b) = {r['ratio_sensitivity_vs_likelihood']:.3f} "
              f"(floor {r['floor_jvp_extra_tangent']:.3f}), (c)/(a) = {r['ratio_sensitivity_vs_sampling']:.3f}; "
              f"one evaluation with K tangents / a forward pass: {curve}")
