"""The fused integration of docs/design.md section 5 (paper Algorithm 1).

One loop over time steps integrates, for a whole batch at once on its device, the state
``(z, log rho, psi)``: the sample path (PF-ODE or reverse SDE), the CCoV log-density
and the sensitivities ``psi`` [K, B, *event] to K perturbation measures at once (or,
from given initial tangents, the flow map's Jacobian along the path).  Each step makes
one model call for the score, its JVPs with all K sensitivities and the Hutchinson
terms (for a network: one vmapped JVP covering every tangent and probe, sharing the
primal).  The step rules live in ``steppers``, the forcing terms in ``forcing``; this
module is the loop and owns its bookkeeping:
batches larger than memory are split into chunks over samples and, when one sample's
K tangents do not fit, over tangents; each chunk is integrated by the same loop and
sent to the host as it finishes.  Every random number is keyed by (seed, sample
index, step) (``keyed_random``), so results do not depend on the split.

With ``tape=True`` the integration also keeps every point where it evaluated the field,
with the log-density used there (a ``Tape``): what the adjoint of ``core.influence``
needs to run the sensitivity equation backwards along the same discrete path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from diffsens_cli import interrupt, progress
from diffsens_cli.core import dynamics, keyed_random
from diffsens_cli.core.forcing import Forcing
from diffsens_cli.core.schedule import Coefficients, Schedule, grid_times, time_grid
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.core.score_sensitivity import WeightStats
from diffsens_cli.core.steppers import Grid, State, StepRule, step_rule


@dataclass
class SolverSettings:
    """What the engine needs from the ``solver`` config group, whose file
    (configs/solver/ode.yaml) holds the defaults and says what each setting means; read
    and checked by ``builders.solver_settings``."""

    method: str  # ode | sde
    integrator: str  # euler | heun (ODE only)
    step_size: float | None
    num_steps: int | None  # overrides step_size when set
    spacing: str  # uniform | log_snr | karras: the time grid
    t_min: float  # truncation in diffusion time: integrate t in [0, 1 - t_min]
    density: str  # ccov (CCoV along the path) | closed_form (model's own density)
    divergence: str  # exact | hutchinson (for ccov)
    hutchinson_samples: int
    probe: str  # gaussian | rademacher
    weight_clamp: tuple[float, float] | None
    batch_size: int | None  # paths integrated at once; None: as many as memory allows
    tangent_batch_size: int | None  # sensitivity tangents integrated at once; None: as memory allows
    seed: int
    progress: bool
    record_every: int | None  # keep every k-th state of the path
    # Along SDE paths: 'drift' differentiates the SDE solution map for fixed noise
    # (forcing 2 c g); 'velocity' is the paper's literal Eq. 2 (forcing c g).
    sde_sensitivity: str

    def grid(self) -> tuple[float, float, int]:
        return time_grid(self.t_min, self.num_steps, self.step_size)

    def evaluations(self) -> int:
        """Score evaluations along one path: the steps times the step rule's evaluations per step."""
        return self.grid()[2] * step_rule(self.method, self.integrator).evaluations

    def times(self, schedule: Schedule) -> torch.Tensor:
        """The grid times (float64, on the CPU) of these settings for ``schedule``."""
        t0, t1, n = self.grid()
        return grid_times(schedule, t0, t1, n, self.spacing)


@dataclass
class IntegrationResult:
    """Everything a run keeps from one integration (tensors on the CPU, but the tape's,
    which stay on the device for the adjoint pass)."""

    z0: torch.Tensor
    samples: torch.Tensor
    logp: torch.Tensor | None
    psi: torch.Tensor | None  # [K, B, *event]
    times: torch.Tensor
    path: torch.Tensor | None = None  # [S, B, *event] at `path_times`
    psi_path: torch.Tensor | None = None  # [S, K, B, *event]
    path_times: torch.Tensor | None = None
    weights: list[WeightStats] = field(default_factory=list)  # one per perturbation measure
    wall_time_s: float = 0.0
    tape: Tape | None = None


class Tape(NamedTuple):
    """The field evaluations of one integration, in order: for evaluation ``i`` the grid
    index ``index[i]``, the point ``z[i]`` [B, *event] and the log-density ``log_rho[i]``
    [B] the forcing was (or would have been) weighted with; ``rule.evaluations`` per step
    (Euler one, Heun two: at ``z_k`` and at the predictor, grid index ``k + 1``)."""

    times: torch.Tensor  # the grid [n + 1]
    rule: StepRule
    psi_gain: float  # the sensitivity equation's score gain (dynamics.SCORE_GAIN)
    index: list[int]
    z: list[torch.Tensor]
    log_rho: list[torch.Tensor]


class _ChunkResult(NamedTuple):
    state: State
    weights: list[WeightStats]
    path: torch.Tensor | None
    psi_path: torch.Tensor | None
    path_times: torch.Tensor | None
    tape: Tape | None


class Integrator:
    """Integrates a batch of paths of ``model`` and, optionally, their log-densities and
    their sensitivities to the measures of ``perturbation`` (see module docstring)."""

    def __init__(self, model: ScoreModel, settings: SolverSettings, perturbation: Forcing | None = None,
                 track_density: bool = False, tape: bool = False):
        self.model, self.cfg, self.perturbation, self.tape = model, settings, perturbation, tape
        self.gain = dynamics.SCORE_GAIN[settings.method]
        self.psi_gain = self.gain if settings.sde_sensitivity == "drift" else dynamics.SCORE_GAIN["ode"]
        self.weighted = perturbation is not None or tape  # the forcing's weights are needed
        self.needs_rho = self.weighted and settings.density == "closed_form"
        self.ccov = settings.density == "ccov" and (track_density or self.weighted)
        self.num_probes = settings.hutchinson_samples if self.ccov and settings.divergence == "hutchinson" else 0
        self.rule = step_rule(settings.method, settings.integrator)

    # -- the augmented vector field at one grid point -----------------------------------
    def _field(self, times: torch.Tensor, co_all: Coefficients, probes: torch.Tensor | None,
               perturbation: Forcing | None, weights: list[WeightStats], tape: list | None):
        """``field(k, state)`` for the step rules; the probes are those of the current step;
        each evaluation's ``(k, z, log rho)`` is appended to ``tape`` if given."""

        def at(k: int, state: State) -> State:
            t, co = times[k], _coefficients_at(co_all, k)
            s, jpsi, quad = self.model.score_with_derivatives(state.z, t, state.psi, probes)
            dz = dynamics.drift(co, state.z, s, self.gain)
            dlogp = None
            if self.ccov:
                tr = quad.mean(0) if self.num_probes else self.model.score_trace(state.z, t)
                dlogp = -dynamics.velocity_divergence(co, state.z[0].numel(), tr)
            log_rho = None
            if self.weighted:
                log_rho = self.model.log_density(state.z, t) if self.needs_rho else state.logp
            if tape is not None:
                tape.append((k, state.z, log_rho))
            dpsi = None
            if state.psi is not None:
                dpsi = dynamics.drift_jvp(co, state.psi, jpsi, self.psi_gain)
                if perturbation is not None:
                    g = perturbation.forcing(state.z, co, log_rho, s, self.cfg.weight_clamp, weights)
                    dpsi = dpsi + self.psi_gain * co.c * g
            return State(dz, dlogp, dpsi)

        return at

    def _probes(self, z: torch.Tensor, ids: torch.Tensor, step: int, replicas: int) -> torch.Tensor | None:
        """Hutchinson probes [h, B, *event] of step ``step``, keyed by sample; replicas share theirs."""
        if not self.num_probes:
            return None
        draw = keyed_random.rademacher if self.cfg.probe == "rademacher" else keyed_random.normal
        e = draw((self.num_probes, *z.shape[1:]), ids, seed=self.cfg.seed, stream=keyed_random.PROBES, step=step,
                 dtype=z.dtype).movedim(1, 0)
        return e if replicas == 1 else e.repeat(1, replicas, *([1] * (z.ndim - 1)))

    def _wiener(self, z: torch.Tensor, ids: torch.Tensor, step: int, replicas: int) -> torch.Tensor:
        """Standard normal increments of step ``step``, keyed by sample; replicas share theirs."""
        xi = keyed_random.normal(tuple(z.shape[1:]), ids, seed=self.cfg.seed, stream=keyed_random.WIENER, step=step,
                                 dtype=z.dtype)
        return xi.repeat(replicas, *([1] * (z.ndim - 1)))

    # -- the fused loop over one chunk -------------------------------------------------
    def _chunk(self, state: State, ids: torch.Tensor, perturbation: Forcing | None, desc: str,
               replicas: int) -> _ChunkResult:
        cfg = self.cfg
        z = state.z
        times = self._times().to(z.device, z.dtype)
        co_all = self.model.schedule.coefficients(times)
        grid, n = Grid(times, co_all), len(times) - 1
        weights = [WeightStats() for _ in range(len(perturbation) if perturbation is not None else 0)]
        path, psi_path, path_idx = [], [], []
        tape = [] if self.tape else None

        def record(k: int) -> None:
            if cfg.record_every and (k % cfg.record_every == 0 or k == n):
                path.append(state.z.detach().cpu())
                psi_path.append(state.psi.detach().cpu() if state.psi is not None else None)
                path_idx.append(k)

        record(0)
        for k in progress.bar(range(n), desc=desc, enabled=cfg.progress, leave=False):
            interrupt.check()
            field = self._field(times, co_all, self._probes(z, ids, k, replicas), perturbation, weights, tape)
            noise = None
            if self.rule.stochastic:
                xi = self._wiener(z, ids, k, replicas)
                noise = dynamics.diffusion(_coefficients_at(co_all, k)) * grid.h(k).sqrt() * xi
            state = self.rule.step(field, k, grid, state, noise)
            record(k + 1)
        return _ChunkResult(
            state, weights,
            path=torch.stack(path) if path else None,
            psi_path=torch.stack(psi_path) if path and state.psi is not None else None,
            path_times=times[path_idx].cpu() if path else None,
            tape=tape,
        )

    @torch.no_grad()  # forward-mode JVPs only: no graph is kept for network parameters
    def run(self, z0: torch.Tensor, logp0: torch.Tensor | None = None, replicas: int = 1,
            psi0: torch.Tensor | None = None, first_index: int = 0,
            sample_ids: torch.Tensor | None = None) -> IntegrationResult:
        """Integrate from ``z0`` [B, *event] at ``t0``; ``logp0`` defaults to the model's
        ``base_log_density``.

        ``psi0`` [K, B, *event] are initial tangents (default zero, one per perturbation
        measure); without a perturbation they follow ``d psi/dt = J_z v psi`` alone, so
        ``psi0 = I`` gives the flow map's Jacobian.  ``first_index`` is the index of
        ``z0``'s first row among all samples of the run (the key of its random numbers);
        ``sample_ids`` [B / replicas], where given, are each row's index instead (rows that
        are not consecutive in the run, such as a batch of chosen samples).
        ``replicas = R`` says that ``z0`` is ``R`` equal, consecutive groups of paths (a
        model family such as ``GaussianMixture.mix`` with several etas): chunks keep the
        groups aligned, and the groups share Wiener increments and Hutchinson probes.
        """
        start = time.perf_counter()
        t0 = self.cfg.grid()[0]
        if z0.shape[0] % replicas:
            raise ValueError(f"a batch of {z0.shape[0]} is not {replicas} equal groups")
        if self.tape and replicas != 1:
            raise ValueError("a tape is kept for paths without replicas")
        if sample_ids is not None and sample_ids.shape != (z0.shape[0] // replicas,):
            raise ValueError(f"sample_ids of shape {tuple(sample_ids.shape)} do not fit {z0.shape[0] // replicas} rows")
        num_k = len(self.perturbation) if self.perturbation is not None else 0
        if psi0 is not None:
            if psi0.shape[1:] != z0.shape or (num_k and psi0.shape[0] != num_k):
                raise ValueError(f"psi0 of shape {tuple(psi0.shape)} does not fit z0 {tuple(z0.shape)} "
                                 f"and {num_k or 'any number of'} measures")
            num_k = psi0.shape[0]
        elif num_k:
            psi0 = z0.new_zeros(num_k, *z0.shape)
        if self.ccov and logp0 is None:
            logp0 = self.model.base_log_density(z0, torch.tensor(t0, dtype=z0.dtype, device=z0.device))
        inner = z0.shape[0] // replicas

        def rows(x: torch.Tensor | None, sl: slice, dim: int = 0) -> torch.Tensor | None:
            if x is None:
                return None
            grouped = x.unflatten(dim, (replicas, inner)).narrow(dim + 1, sl.start, sl.stop - sl.start)
            return grouped.flatten(dim, dim + 1)

        chunk_b, chunk_k = self._chunk_sizes(z0, num_k, replicas)
        outs: list[_ChunkResult] = []
        begin, index = 0, 0
        while begin < inner:
            sl = slice(begin, min(begin + chunk_b, inner))
            num = math.ceil((inner - begin) / chunk_b) + index
            ids = (torch.arange(sl.start, sl.stop, device=z0.device) + first_index if sample_ids is None
                   else sample_ids[sl].to(z0.device))
            try:
                parts = []
                for kb in range(0, max(num_k, 1), max(chunk_k, 1)):
                    ks = slice(kb, min(kb + chunk_k, num_k))
                    desc = f"integrate {index + 1}/{num}" if num > 1 else "integrate"
                    if chunk_k < num_k:
                        desc += f" tangents {ks.start + 1}-{ks.stop}/{num_k}"
                    state = State(rows(z0, sl), rows(logp0, sl) if self.ccov else None,
                                  rows(psi0[ks], sl, dim=1) if num_k else None)
                    pert = self.perturbation.select(ks).rows(sl) if self.perturbation is not None else None
                    out = self._chunk(state, ids, pert, desc, replicas)
                    s = out.state
                    parts.append(out._replace(state=State(_to_host(s.z), _to_host(s.logp), _to_host(s.psi))))
            except torch.OutOfMemoryError:
                if self.cfg.batch_size is None and chunk_b > 1:
                    chunk_b = max(1, chunk_b // 2)
                elif self.cfg.tangent_batch_size is None and chunk_k > 1:
                    chunk_k = max(1, chunk_k // 2)
                else:
                    raise
                continue
            outs.append(_join_tangent_chunks(parts))
            begin, index = sl.stop, index + 1
        if z0.device.type == "cuda":
            torch.cuda.synchronize(z0.device)  # the non-blocking copies to the host

        def merge(parts: list, dim: int = 0) -> torch.Tensor | None:
            """Chunks of replica-major rows back into one replica-major batch."""
            if parts[0] is None:
                return None
            grouped = [p.unflatten(dim, (replicas, -1)) for p in parts]
            return torch.cat(grouped, dim + 1).flatten(dim, dim + 1)

        tape = None
        if self.tape:
            first = outs[0].tape
            tape = Tape(self._times(), self.rule, self.psi_gain,
                        index=[k for k, _, _ in first],
                        z=[torch.cat([o.tape[i][1] for o in outs]) for i in range(len(first))],
                        log_rho=[torch.cat([o.tape[i][2] for o in outs]) for i in range(len(first))])
        weights = [WeightStats() for _ in range(len(self.perturbation) if self.perturbation is not None else 0)]
        for out in outs:
            for total, part in zip(weights, out.weights, strict=True):
                total.merge(part)
        return IntegrationResult(
            z0=z0.cpu(), samples=merge([o.state.z for o in outs]), logp=merge([o.state.logp for o in outs]),
            psi=merge([o.state.psi for o in outs], dim=1), times=self._times(),
            path=merge([o.path for o in outs], dim=1), psi_path=merge([o.psi_path for o in outs], dim=2),
            path_times=outs[0].path_times, weights=weights, wall_time_s=time.perf_counter() - start, tape=tape,
        )

    @torch.no_grad()
    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """The starting points z0 [B, *event] whose probability-flow paths end at ``x``: the
        step rule run backwards along the reversed grid (the inversion DDIM users know),
        exact as the steps shrink, at the rule's order. The PF-ODE only: an SDE's end
        point does not determine its start."""
        if self.rule.stochastic:
            raise ValueError(f"inversion follows the probability-flow ODE; {self.rule.name} is stochastic")
        times = self._times().flip(0).to(x.device, x.dtype)
        co_all = self.model.schedule.coefficients(times)
        grid = Grid(times, co_all)

        def field(k: int, state: State) -> State:
            score = self.model.score(state.z, times[k])
            return State(dynamics.drift(_coefficients_at(co_all, k), state.z, score, self.gain), None, None)

        rows, _ = self._chunk_sizes(x, 0, 1)  # as a forward run splits its paths: results do not depend on it
        out = []
        for start in range(0, len(x), rows):
            state = State(x[start:start + rows], None, None)
            for k in progress.bar(range(len(times) - 1), desc="invert", enabled=self.cfg.progress, leave=False):
                interrupt.check()
                state = self.rule.step(field, k, grid, state, None)
            out.append(state.z)
        return torch.cat(out)

    def _times(self) -> torch.Tensor:
        """The grid times (float64, on the CPU)."""
        return self.cfg.times(self.model.schedule)

    def _chunk_sizes(self, z0: torch.Tensor, num_k: int, replicas: int) -> tuple[int, int]:
        """Rows (per replica group) and tangents per chunk: the settings' sizes, or the
        largest that fit in about half of the free memory (on a CPU, in the model's ``cpu_chunk_bytes``),
        splitting the tangents only when one row's tangents do not fit."""
        inner = z0.shape[0] // replicas
        numel, itemsize = z0[0].numel(), z0.element_size()

        tape = tape_bytes(numel, itemsize, self.cfg.evaluations()) if self.tape else 0

        def per_row(k: int) -> int:
            tangents = self.num_probes + k
            b = self.model.memory_per_sample(numel, tangents, itemsize)
            b += itemsize * numel * (6 + 2 * tangents) + tape  # the state, its derivatives, probes; the tape
            if self.perturbation is not None:
                b += self.perturbation.memory_per_sample(itemsize) + itemsize * numel * 2 * k  # the forcing
            return b * replicas

        budget = memory_budget(self.model, z0.device)
        chunk_k = self.cfg.tangent_batch_size or num_k
        if self.cfg.tangent_batch_size is None:
            while chunk_k > 1 and per_row(chunk_k) > budget:
                chunk_k = (chunk_k + 1) // 2
        chunk_k = min(chunk_k, num_k)
        chunk_b = self.cfg.batch_size or max(1, min(inner, int(budget // per_row(chunk_k))))
        return chunk_b, chunk_k


def _join_tangent_chunks(parts: list[_ChunkResult]) -> _ChunkResult:
    """One row chunk's results from its tangent chunks (which share the path)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    psi = torch.cat([p.state.psi for p in parts])
    psi_path = torch.cat([p.psi_path for p in parts], 1) if first.psi_path is not None else None
    return first._replace(state=first.state._replace(psi=psi), weights=[w for p in parts for w in p.weights],
                          psi_path=psi_path)


def _to_host(x: torch.Tensor | None) -> torch.Tensor | None:
    """A non-blocking copy into pinned host memory (a pageable copy costs more than
    several integration steps on a GPU); the caller synchronises."""
    if x is None or x.device.type != "cuda":
        return None if x is None else x.cpu()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


def _coefficients_at(co: Coefficients, k: int) -> Coefficients:
    return Coefficients(alpha=co.alpha[k], sigma=co.sigma[k], a=co.a[k], c=co.c[k])


def memory_budget(model: ScoreModel, device: torch.device) -> float:
    """Bytes one chunk of work may take on ``device``: about half of its free memory, and on a
    CPU at most the model's ``cpu_chunk_bytes`` (the rule both the forward tangents and the
    adjoint's cotangents are chunked by)."""
    budget = 0.5 * _free_memory(device)
    if device.type == "cpu" and model.cpu_chunk_bytes:
        budget = min(budget, model.cpu_chunk_bytes)
    return budget


def tape_bytes(numel: int, itemsize: int, evaluations: int) -> int:
    """What an adjoint's tape keeps per path: the state and log-density at each of its ``evaluations``."""
    return itemsize * (numel + 1) * evaluations


def vectors_that_fit(model: ScoreModel, rows: int, numel: int, count: int, itemsize: int, budget: float) -> int:
    """How many of ``count`` tangents or cotangents one network call over ``rows`` paths may
    carry within ``budget`` bytes: all, halved until they fit (at least one)."""
    size = count
    while size > 1 and rows * model.memory_per_sample(numel, size, itemsize) > budget:
        size = (size + 1) // 2
    return size


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
