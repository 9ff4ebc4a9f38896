"""Engine cost benchmark: is a sensitivity run about as cheap as sampling + likelihood?

Times, side by side in one process on one score model, batch and step count:
(a) PF-ODE sampling, (b) sampling + CCoV log-density with h Hutchinson probes,
(c) the full sensitivity run (b plus the sensitivity tangent and Eq. 1 with nu).
Runs are interleaved and repeated, and the median of each is kept.  The floor of
(c)/(b) is the marginal cost of one more tangent in the same vmapped JVP; it is
measured on its own and reported beside the ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from omegaconf import DictConfig

from diffsens_cli.builders import Components
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.errors import require, whole
from diffsens_cli.rundir import RunDir


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def check(cfg: DictConfig) -> None:
    Components(cfg)
    for field in ("batch_size", "repeats"):
        key = f"bench.{field}"
        require(whole(cfg.bench[field], key) >= 1, key, f"must be >= 1, got {cfg.bench[field]}")


def run(cfg: DictConfig, run: RunDir) -> None:
    check(cfg)
    comp = Components(cfg).on_device()
    bc = cfg.bench
    dev, dt = comp.device, comp.dtype
    gen = torch.Generator(dev).manual_seed(int(cfg.seed))
    b, d = int(bc.batch_size), comp.target.dim
    t0 = torch.tensor(0.0, dtype=dt, device=dev)
    z0 = comp.model.sample_base(b, (d,), t0, gen)

    base = replace(comp.solver, progress=False, density="ccov", divergence="hutchinson")
    h = base.hutchinson_samples
    modes = {
        "sampling": Integrator(comp.model, base),
        "likelihood": Integrator(comp.model, base, track_density=True),
        "sensitivity": Integrator(comp.model, base, comp.perturbation),
    }
    timed = _timer(dev)
    times: dict[str, list[float]] = {k: [] for k in modes}
    with torch.no_grad():
        for integ in modes.values():  # warm-up
            integ.run(z0)
        for _ in range(int(bc.repeats)):
            for name, integ in modes.items():
                times[name].append(timed(lambda: integ.run(z0)))

        # The floor: one vmapped JVP with h + 1 tangents against one with h.
        t = torch.tensor(0.5, dtype=dt, device=dev)
        tangents = torch.randn(h + 1, *z0.shape, generator=gen, dtype=dt, device=dev)
        jvp_times = {}
        for n in (h, h + 1):
            comp.model.score_and_jvp(z0, t, tangents[:n])
            jvp_times[n] = statistics.median(
                timed(lambda: comp.model.score_and_jvp(z0, t, tangents[:n])) for _ in range(10 * int(bc.repeats)))
        forward = statistics.median(timed(lambda: comp.model.score(z0, t)) for _ in range(10 * int(bc.repeats)))

    med = {k: statistics.median(v) for k, v in times.items()}
    steps = base.grid()[2]
    metrics = {
        "ratio_sensitivity_vs_likelihood": med["sensitivity"] / med["likelihood"],
        "ratio_sensitivity_vs_sampling": med["sensitivity"] / med["sampling"],
        "ratio_likelihood_vs_sampling": med["likelihood"] / med["sampling"],
        "floor_jvp_extra_tangent": jvp_times[h + 1] / jvp_times[h],
        "time_sampling_s": med["sampling"],
        "time_likelihood_s": med["likelihood"],
        "time_sensitivity_s": med["sensitivity"],
        "ms_per_step": {k: 1e3 * v / steps for k, v in med.items()},
        "ms_forward": 1e3 * forward,
        "ms_jvp": {f"{n}_tangents": 1e3 * v for n, v in jvp_times.items()},
    }
    run.save_arrays("arrays", {f"times_{k}": torch.tensor(v).numpy() for k, v in times.items()})
    run.write_summary(metrics, device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                      dtype=str(dt), batch_size=b, dim=d, num_steps=steps, hutchinson_samples=h,
                      perturbation_size=comp.perturbation.measures[0].means.shape[0], repeats=int(bc.repeats),
                      threads=torch.get_num_threads())
    print(f"bench_engine on {dev}: (c)/(b) = {metrics['ratio_sensitivity_vs_likelihood']:.3f}, "
          f"(c)/(a) = {metrics['ratio_sensitivity_vs_sampling']:.3f}, "
          f"floor (h+1)/h tangents = {metrics['floor_jvp_extra_tangent']:.3f}")
