"""The fused integration of DESIGN.md section 5 (paper Algorithm 1).

One loop over time steps integrates, for a whole batch at once on its device, the state
``(z, log rho, psi)``: the sample path (PF-ODE or reverse SDE), the CCoV log-density
and the sample sensitivity.  Each step makes one model call for the score, its JVP with
the sensitivity and the Hutchinson terms (for a network: one vmapped JVP covering the
tangent and every probe).  Batches larger than memory are split into chunks, each
integrated by the same loop, its results sent to the host as it finishes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from diffsens_cli import interrupt
from diffsens_cli.core import dynamics
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import Coefficients, time_grid
from diffsens_cli.core.score_sensitivity import WeightStats, score_sensitivity
from diffsens_cli.models.base import ScoreModel


@dataclass
class SolverSettings:
    """What the engine needs from the ``solver`` config group."""

    method: str = "ode"  # ode | sde
    integrator: str = "euler"  # euler | heun (ODE only)
    step_size: float | None = 1e-3
    num_steps: int | None = None
    t_min: float = 1e-3  # truncation in diffusion time: integrate t in [0, 1 - t_min]
    density: str = "ccov"  # ccov (CCoV along the path) | closed_form (model's own density)
    divergence: str = "hutchinson"  # exact | hutchinson (for ccov)
    hutchinson_samples: int = 1
    probe: str = "gaussian"  # gaussian | rademacher
    weight_clamp: tuple[float, float] | None = None
    # Paths integrated at once (in each replica group); None: as many as memory allows.
    # SDE noise is drawn per chunk, so runs compared path by path need equal batch sizes.
    batch_size: int | None = None
    seed: int = 0
    progress: bool = True
    record_every: int | None = None  # keep every k-th state of the path
    # Along SDE paths: 'drift' differentiates the SDE solution map for fixed noise
    # (forcing 2 c g); 'velocity' is the paper's literal Eq. 2 (forcing c g).
    sde_sensitivity: str = "drift"

    def grid(self) -> tuple[float, float, int]:
        return time_grid(self.t_min, self.num_steps, self.step_size)


@dataclass
class Perturbation:
    """A closed-form perturbation measure ``nu``; ``sign = -1`` removes it instead."""

    measure: GaussianMixture
    sign: float = 1.0


@dataclass
class IntegrationResult:
    """Everything a run keeps from one integration (tensors on the CPU)."""

    z0: torch.Tensor
    samples: torch.Tensor
    logp: torch.Tensor | None
    psi: torch.Tensor | None
    times: torch.Tensor
    path: torch.Tensor | None = None  # [S, B, *event] at `path_times`
    psi_path: torch.Tensor | None = None
    path_times: torch.Tensor | None = None
    weights: WeightStats = field(default_factory=WeightStats)
    wall_time_s: float = 0.0


class _ChunkResult(NamedTuple):
    z: torch.Tensor
    logp: torch.Tensor | None
    psi: torch.Tensor | None
    weights: WeightStats
    path: torch.Tensor | None
    psi_path: torch.Tensor | None
    path_times: torch.Tensor | None


class Integrator:
    """Integrates a batch of paths of ``model`` and, optionally, their log-densities and
    their sensitivities to ``perturbation`` (see module docstring)."""

    def __init__(self, model: ScoreModel, settings: SolverSettings, perturbation: Perturbation | None = None,
                 track_density: bool = False):
        self.model, self.cfg, self.perturbation = model, settings, perturbation
        self.gain = dynamics.SCORE_GAIN[settings.method]
        self.psi_gain = self.gain if settings.sde_sensitivity == "drift" else dynamics.SCORE_GAIN["ode"]
        self.needs_rho = perturbation is not None and settings.density == "closed_form"
        self.ccov = settings.density == "ccov" and (track_density or perturbation is not None)
        self.num_probes = settings.hutchinson_samples if self.ccov and settings.divergence == "hutchinson" else 0

    # -- one evaluation of the augmented vector field -------------------------------
    def _field(self, t: torch.Tensor, co: Coefficients, z, logp, psi, probes, weights: WeightStats):
        s, jpsi, quad = self.model.score_with_derivatives(z, t, psi, probes)
        dz = dynamics.drift(co, z, s, self.gain)

        dlogp = None
        if self.ccov:
            tr = quad.mean(0) if self.num_probes else self.model.score_trace(z, t)
            dlogp = -dynamics.velocity_divergence(co, z[0].numel(), tr)

        dpsi = None
        if psi is not None:
            log_rho = self.model.log_density(z, t) if self.needs_rho else logp
            nu = self.perturbation.measure.diffused(z.flatten(1), co.alpha, co.sigma)
            g = score_sensitivity(nu.log_density, nu.score.view_as(z), log_rho, s, self.cfg.weight_clamp, weights)
            dpsi = self.psi_gain * co.c * self.perturbation.sign * g + dynamics.drift_jvp(co, psi, jpsi, self.psi_gain)
        return dz, dlogp, dpsi

    def _probes(self, z: torch.Tensor, gen: torch.Generator, replicas: int = 1) -> torch.Tensor | None:
        """Hutchinson probes for the batch ``z``; replicas share theirs."""
        if not self.num_probes:
            return None
        shape = (self.num_probes, z.shape[0] // replicas, *z.shape[1:])
        e = torch.empty(shape, device=z.device, dtype=z.dtype)
        if self.cfg.probe == "rademacher":
            e.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        else:
            e.normal_(generator=gen)
        return e if replicas == 1 else e.repeat(1, replicas, *([1] * (z.ndim - 1)))

    # -- the fused loop over one chunk -------------------------------------------------
    def _chunk(self, z: torch.Tensor, logp: torch.Tensor | None, chunk_index: int, desc: str, replicas: int):
        cfg = self.cfg
        t0, t1, n = cfg.grid()
        times = torch.linspace(t0, t1, n + 1, dtype=z.dtype, device=z.device)
        co_all = self.model.schedule.coefficients(times)
        h = (t1 - t0) / n
        probe_gen = torch.Generator(z.device).manual_seed(cfg.seed * 7919 + 2 * chunk_index)
        noise_gen = torch.Generator(z.device).manual_seed(cfg.seed * 7919 + 2 * chunk_index + 1)
        psi = torch.zeros_like(z) if self.perturbation is not None else None
        weights = WeightStats()
        path, psi_path, path_idx = [], [], []

        def record(k: int) -> None:
            if cfg.record_every and (k % cfg.record_every == 0 or k == n):
                path.append(z.detach().cpu())
                psi_path.append(psi.detach().cpu() if psi is not None else None)
                path_idx.append(k)

        record(0)
        for k in tqdm(range(n), desc=desc, disable=not cfg.progress, leave=False):
            interrupt.check()
            t = times[k]
            co = _coefficients_at(co_all, k)
            probes = self._probes(z, probe_gen, replicas)
            dz, dlogp, dpsi = self._field(t, co, z, logp, psi, probes, weights)
            if cfg.integrator == "heun":
                z2, logp2, psi2 = _step(h, z, logp, psi, dz, dlogp, dpsi)
                dz2, dlogp2, dpsi2 = self._field(times[k + 1], _coefficients_at(co_all, k + 1), z2, logp2, psi2,
                                                 probes, weights)
                z, logp, psi = _step(h / 2, z, logp, psi, dz + dz2, _add(dlogp, dlogp2), _add(dpsi, dpsi2))
            else:
                z, logp, psi = _step(h, z, logp, psi, dz, dlogp, dpsi)
            if cfg.method == "sde":
                xi = torch.randn((z.shape[0] // replicas, *z.shape[1:]), generator=noise_gen, device=z.device,
                                 dtype=z.dtype)
                z = z + dynamics.diffusion(co) * math.sqrt(h) * xi.repeat(replicas, *([1] * (z.ndim - 1)))
            record(k + 1)
        return _ChunkResult(
            z, logp, psi, weights,
            path=torch.stack(path) if path else None,
            psi_path=torch.stack(psi_path) if path and psi is not None else None,
            path_times=times[path_idx].cpu() if path else None,
        )

    @torch.no_grad()  # forward-mode JVPs only: no graph is kept for network parameters
    def run(self, z0: torch.Tensor, logp0: torch.Tensor | None = None, replicas: int = 1) -> IntegrationResult:
        """Integrate from ``z0`` [B, *event] at ``t0``; ``logp0`` defaults to the model's
        ``base_log_density``.

        ``replicas = R`` says that ``z0`` is ``R`` equal, consecutive groups of paths (a
        model family such as ``GaussianMixture.mix`` with several etas): chunks keep the
        groups aligned, and the groups share Wiener increments and Hutchinson probes.
        """
        start = time.perf_counter()
        t0, t1, n = self.cfg.grid()
        if z0.shape[0] % replicas:
            raise ValueError(f"a batch of {z0.shape[0]} is not {replicas} equal groups")
        if self.ccov and logp0 is None:
            logp0 = self.model.base_log_density(z0, torch.tensor(t0, dtype=z0.dtype, device=z0.device))
        inner = z0.shape[0] // replicas

        def rows(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
            return None if x is None else x.view(replicas, inner, *x.shape[1:])[:, sl].reshape(-1, *x.shape[1:])

        chunk = self.cfg.batch_size or max(1, self._auto_chunk_size(z0) // replicas)
        outs, weights = [], WeightStats()
        begin, index = 0, 0
        while begin < inner:
            sl = slice(begin, begin + chunk)
            num = math.ceil(inner / chunk)
            desc = f"integrate {index + 1}/{num}" if num > 1 else "integrate"
            try:
                out = self._chunk(rows(z0, sl), rows(logp0, sl) if self.ccov else None, index, desc, replicas)
            except torch.OutOfMemoryError:
                if self.cfg.batch_size is not None or chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                continue
            outs.append(out._replace(z=_to_host(out.z), logp=_to_host(out.logp), psi=_to_host(out.psi)))
            weights.merge(out.weights)
            begin, index = begin + chunk, index + 1
        if z0.device.type == "cuda":
            torch.cuda.synchronize(z0.device)  # the non-blocking copies to the host

        def merge(parts: list, dim: int = 0) -> torch.Tensor | None:
            """Chunks of replica-major rows back into one replica-major batch."""
            if parts[0] is None:
                return None
            grouped = [p.unflatten(dim, (replicas, -1)) for p in parts]
            return torch.cat(grouped, dim + 1).flatten(dim, dim + 1)

        return IntegrationResult(
            z0=z0.cpu(), samples=merge([o.z for o in outs]), logp=merge([o.logp for o in outs]),
            psi=merge([o.psi for o in outs]), times=torch.linspace(t0, t1, n + 1, dtype=torch.float64),
            path=merge([o.path for o in outs], dim=1), psi_path=merge([o.psi_path for o in outs], dim=1),
            path_times=outs[0].path_times,
            weights=weights, wall_time_s=time.perf_counter() - start,
        )

    def _auto_chunk_size(self, z0: torch.Tensor) -> int:
        """The largest number of rows that fits in about half of the free memory."""
        numel, itemsize = z0[0].numel(), z0.element_size()
        tangents = self.num_probes + (self.perturbation is not None)
        per_sample = self.model.memory_per_sample(numel, tangents, itemsize)
        per_sample += itemsize * numel * (6 + 2 * tangents)  # the state, its derivatives, probes
        if self.perturbation is not None:
            per_sample += self.perturbation.measure.memory_per_sample(0, itemsize)
        return max(1, min(z0.shape[0], int(0.5 * _free_memory(z0.device) // per_sample)))


def _to_host(x: torch.Tensor | None) -> torch.Tensor | None:
    """A non-blocking copy into pinned host memory (a pageable copy costs more than
    several integration steps on a GPU); the caller synchronises."""
    if x is None or x.device.type != "cuda":
        return None if x is None else x.cpu()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


def _coefficients_at(co: Coefficients, k: int) -> Coefficients:
    return Coefficients(alpha=co.alpha[k], sigma=co.sigma[k], a=co.a[k], c=co.c[k])


def _add(x, y):
    return None if x is None else x + y


def _step(h, z, logp, psi, dz, dlogp, dpsi):
    return z + h * dz, None if logp is None else logp + h * dlogp, None if psi is None else psi + h * dpsi


def _free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
