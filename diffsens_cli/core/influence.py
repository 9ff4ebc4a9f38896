"""Per-training-sample influence (docs/design.md section 7, paper Sec. 4.4).

For the point masses ``nu = delta_{x_n}`` of N training points, the sensitivity
``psi^n`` of a model sample follows the same linear equation along the same path for
every n; only the forcing differs.  Two operations give everything else at a number of
network passes that does not grow with N:

- forward: ``sum_n u_n psi^n`` for weights ``u`` is one tangent of the ordinary
  integration with the forcing of ``sum_n u_n delta_{x_n}`` (``EmpiricalForcing`` with
  ``mix``); with one point per tangent it is the paper's method (``exact``);
- adjoint: ``omega^T psi^n`` for every n is one reverse pass along the recorded path
  (``project``): ``lambda_k = A_k^T lambda_{k+1}`` with one VJP per field evaluation,
  and an ``N x d`` product with the training points per step, no network call.

The adjoint is the exact transpose of the discrete scheme (each step rule's own
``adjoint``, in ``core.steppers``), so both agree to round-off.  Scores from random orthogonal projections
(exact when their number reaches d), ``randomized_svd`` (Halko-Martinsson-Tropp with
power iterations) and ``refine`` (scores exact in the span of the singular vectors
found, estimated in the rest) are built from the two.

The weight ``nu_t / rho_t`` of each point is ``N(z; alpha x_n, sigma^2 I) / rho_t(z)``,
clamped per point, so the forcing stays linear in ``u``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from diffsens_cli import interrupt, progress
from diffsens_cli.core.forcing import EmpiricalForcing
from diffsens_cli.core.integrate import Integrator, SolverSettings, Tape, memory_budget, vectors_that_fit
from diffsens_cli.core.schedule import Coefficients
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.core.score_sensitivity import WeightStats


def project(model: ScoreModel, tape: Tape, forcing: EmpiricalForcing, omega: torch.Tensor,
            clamps: list[tuple[float, float] | None], stats: list[WeightStats] | None = None,
            desc: str = "adjoint", show_progress: bool = True, chunk: int | None = None) -> torch.Tensor:
    """``omega[j, b]^T psi^n_b`` [len(clamps), m, B, N] for every training point n, for
    the cotangents ``omega`` [m, B, *event] at the end of the path recorded in ``tape``:
    one reverse pass (one VJP per field evaluation with all m cotangents), the inner
    products formed for each weight clamp in ``clamps`` (the path is shared).

    The cotangents are independent: ``chunk`` of them go through one pass (None: as many as
    the memory budget allows, ``integrate.memory_budget``, the forward tangents' rule, and
    halved while memory still runs out), which changes nothing but memory and time."""
    stats = stats if stats is not None else [WeightStats() for _ in clamps]
    size = chunk or vectors_that_fit(model, omega.shape[1], omega[0, 0].numel(), len(omega), omega.element_size(),
                                     memory_budget(model, omega.device))
    parts, start = [], 0
    while start < len(omega):
        stop = min(start + size, len(omega))
        label = desc if size >= len(omega) else f"{desc} {start + 1}-{stop}/{len(omega)}"
        counted = [WeightStats(per_row=s.per_row) for s in stats]  # every chunk sees the same weights: once
        try:
            parts.append(_reverse_pass(model, tape, forcing, omega[start:stop], clamps, counted, label, show_progress))
        except torch.OutOfMemoryError:
            if chunk is not None or size == 1:
                raise
            size = max(1, size // 2)
            continue
        if start == 0:
            for total, part in zip(stats, counted, strict=True):
                total.merge(part)
        start = stop
    return torch.cat(parts, 1)


def _reverse_pass(model: ScoreModel, tape: Tape, forcing: EmpiricalForcing, omega: torch.Tensor,
                  clamps: list[tuple[float, float] | None], stats: list[WeightStats], desc: str,
                  show_progress: bool) -> torch.Tensor:
    """``project`` for one chunk of cotangents."""
    out = omega.new_zeros(len(clamps), omega.shape[0], omega.shape[1], len(forcing.points))

    def visit(lam: torch.Tensor, z: torch.Tensor, co: Coefficients, log_rho: torch.Tensor, s: torch.Tensor,
              weight: torch.Tensor) -> None:
        for j, clamp in enumerate(clamps):
            out[j] += weight * forcing.inner(lam, z, co, log_rho, s, clamp, stats[j])

    reverse_pass(model, tape, omega, visit, desc, show_progress)
    return out


Visit = Callable[[torch.Tensor, torch.Tensor, Coefficients, torch.Tensor, torch.Tensor, torch.Tensor], None]


def reverse_pass(model: ScoreModel, tape: Tape, omega: torch.Tensor, visit: Visit, desc: str = "adjoint",
                 show_progress: bool = True) -> torch.Tensor:
    """The adjoint of the sensitivity equation along the path recorded in ``tape``, from the
    cotangents ``omega`` [m, B, *event] at its end: one VJP per field evaluation, each step
    rule's own adjoint.  At every evaluation ``visit(lam, z, co, log_rho, score, weight)`` sees
    the cotangent ``lam`` of what that evaluation's field adds to psi, and ``weight``, the factor
    a forcing ``F`` there enters psi's end with (``<psi_end, omega> += weight <F, lam>``): what
    ``project`` turns into influence scores, and ``proxy_score.predicted_covariance`` into the
    variance of a noisy score.  Returns the cotangent at the start."""
    times = tape.times.to(omega.device, omega.dtype)
    co_all = model.schedule.coefficients(times)
    gain = tape.psi_gain
    n, m = len(times) - 1, tape.rule.evaluations
    if len(tape.index) != n * m:
        raise ValueError(f"a tape of {len(tape.index)} evaluations does not fit {n} {tape.rule.name} steps")

    def pull(i: int, lam: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Visits evaluation i with ``lam``; returns ``J_v^T lam`` there."""
        k = tape.index[i]
        co = Coefficients(co_all.alpha[k], co_all.sigma[k], co_all.a[k], co_all.c[k])
        z, log_rho = tape.z[i], tape.log_rho[i]
        s, jt = model.score_and_vjp(z, times[k], lam)
        visit(lam, z, co, log_rho, s, scale * gain * co.c)
        return co.a * lam + gain * co.c * jt

    lam = omega
    for k in progress.bar(reversed(range(n)), desc=desc, enabled=show_progress, leave=False, total=n):
        interrupt.check()
        lam = tape.rule.adjoint(lambda j, lam, scale, k=k: pull(m * k + j, lam, scale), times[k + 1] - times[k], lam)
    return lam


def orthogonal_directions(d: int, m: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``m`` orthonormal directions in R^d [m, d] (Haar-random), scaled by ``sqrt(d / m)``
    so that ``|Q psi|^2`` is an unbiased estimate of ``|psi|^2`` (exact when ``m = d``)."""
    g = torch.randn(d, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # Haar: fix the signs QR leaves arbitrary
    return (q.T * math.sqrt(d / m)).to(dtype)


def randomized_svd(sketch: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                   adjoint: Callable[[torch.Tensor], torch.Tensor], rank: int,
                   power_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular values [B, rank] and right singular vectors [B, rank, d] of
    each sample's ``N x d`` sensitivity matrix ``Psi_b`` (Halko, Martinsson and Tropp,
    Alg. 4.4 and 5.1), matrix-free.

    ``sketch`` [B, N, l] is ``Psi_b Omega`` for a random ``Omega`` (its l columns: rank
    plus oversampling); ``forward(mix)`` gives ``sum_n mix[j, b, n] psi^n_b`` [l, B, d]
    and ``adjoint(w)`` gives ``w[j, b]^T psi^n_b`` [l, B, N]."""
    y = sketch
    for _ in range(power_iterations):
        q = torch.linalg.qr(y).Q  # [B, N, l]
        z = forward(q.transpose(1, 2).movedim(1, 0))  # Psi^T Q: [l, B, d]
        zq = torch.linalg.qr(z.movedim(0, -1)).Q  # [B, d, l]
        y = adjoint(zq.movedim(-1, 0)).movedim(0, -1)  # Psi (orth Psi^T Q): [B, N, l]
    q = torch.linalg.qr(y).Q
    small = forward(q.transpose(1, 2).movedim(1, 0)).movedim(0, 1)  # Q^T Psi: [B, l, d]
    _, sv, vh = torch.linalg.svd(small, full_matrices=False)
    return sv[:, :rank], vh[:, :rank]


def refine(proj: torch.Tensor, q: torch.Tensor, vh: torch.Tensor, psi_v: torch.Tensor,
           width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores and singular triples from the sketch, exact in the span of the right singular
    vectors found and estimated only in the rest (a Hutch++-style control variate).

    ``proj`` [C, m, B, N] are the projections ``q_j^T psi^n`` on the directions ``q``
    [m, d] of ``orthogonal_directions``; ``vh`` [B, r, d] orthonormal directions computed
    from the first ``width`` projections alone; ``psi_v`` [C, r, B, N] the exact
    ``v_i^T psi^n`` (one more adjoint pass).  By Pythagoras
    ``|psi^n|^2 = |V^T psi^n|^2 + |x^n|^2`` with ``x^n = (I - V V^T) psi^n``; the first term
    is exact, the second is estimated from the projections of ``x^n``: exactly on the
    first ``width`` directions, and unbiasedly from the other ``m - width`` (given the
    first, they are Haar-random in the rest of R^d).  When ``Psi`` is close to rank r the
    estimated part is small, and so is its error; at ``m = d`` everything is exact.

    Returns the scores [C, B, N], and the Rayleigh-Ritz singular values [B, r] and right
    singular vectors [B, r, d] of ``Psi V`` under the first clamp."""
    m, d = q.shape
    unit = q * math.sqrt(m / d)  # q's rows as unit vectors
    coeff = torch.einsum("md,brd->bmr", unit, vh)  # [B, m, r]
    x_proj = proj * math.sqrt(m / d) - torch.einsum("bmr,crbn->cmbn", coeff, psi_v)  # unit_j^T x^n
    captured = x_proj[:, :width].pow(2).sum(1)
    rest = x_proj[:, width:].pow(2).sum(1) * ((d - width) / (m - width)) if m > width else 0.0
    scores = (psi_v.pow(2).sum(1) + captured + rest).sqrt()
    _, sv, wh = torch.linalg.svd(psi_v[0].permute(1, 2, 0), full_matrices=False)  # Psi V = U S W^T: [B, N, r]
    return scores, sv, wh @ vh


class CountingModel:
    """A score model that counts its network calls and the vectors (tangents, probes,
    cotangents) they carry: the cost measure of the influence methods."""

    def __init__(self, model: ScoreModel):
        self.model, self.calls, self.vectors = model, 0, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def _count(self, *vectors: torch.Tensor | None) -> None:
        self.calls += 1
        self.vectors += sum(len(v) for v in vectors if v is not None)

    def score_with_derivatives(self, z, t, psi=None, probes=None):
        self._count(psi, probes)
        return self.model.score_with_derivatives(z, t, psi, probes)

    def score_and_vjp(self, z, t, cotangents):
        self._count(cotangents)
        return self.model.score_and_vjp(z, t, cotangents)

    def score_trace(self, z, t):
        self.calls += 1
        self.vectors += z[0].numel()
        return self.model.score_trace(z, t)


@dataclass
class InfluenceSettings:
    """How the N sensitivities are summarised: the ``influence`` config group
    (configs/influence/sketch.yaml holds the defaults), read by
    ``pipelines.influence.influence_settings``."""

    method: str  # exact (one tangent per point) | sketch (adjoint projections)
    projections: int  # m: random orthogonal projections (exact scores once m >= d)
    rank: int  # singular triples kept
    oversample: int  # extra columns of the randomised range finder
    power_iterations: int
    seed: int


@dataclass
class InfluenceResult:
    """Influence of N training points on B model samples (tensors on the CPU)."""

    samples: torch.Tensor  # [B, *event]
    scores: torch.Tensor  # [C, B, N]: |psi^n|, one row per weight clamp asked for
    # [C, m, B, N]: q_j^T psi^n on the sketch's orthogonal directions (scaled so that |q psi|^2
    # estimates |psi|^2; a rotation of psi^n when m = d), or psi^n itself for the exact method
    projections: torch.Tensor
    singular_values: torch.Tensor  # [B, rank] of each sample's N x d matrix (first clamp)
    singular_vectors: torch.Tensor  # [B, rank, *event]: the right singular vectors
    frobenius_sq: torch.Tensor  # [B]: sum_n |psi^n|^2 (first clamp)
    exact: bool  # the scores and singular triples are exact (not randomised estimates)
    network_calls: int
    network_vectors: int
    weights: list[WeightStats]  # per clamp


def influence(model: ScoreModel, settings: SolverSettings, points: torch.Tensor, z0: torch.Tensor,
              cfg: InfluenceSettings, clamps: list[tuple[float, float] | None],
              first_index: int = 0, block: int | None = None,
              sample_ids: torch.Tensor | None = None) -> InfluenceResult:
    """Influence scores of every training point in ``points`` [N, *event] on the samples
    from ``z0`` [B, *event] (the rows from ``first_index`` of a run, or the rows
    ``sample_ids``: the key of their random numbers), under each weight clamp in
    ``clamps``, and the top singular triples of each sample's sensitivity matrix under
    the first, by ``cfg.method``.  With the
    sketch and fewer projections than dimensions the singular triples are randomised
    (the range finder takes the first ``min(rank + oversample, projections // 2)``
    projections) and the scores and Frobenius norm are estimates, exact in the span of
    the singular vectors found and Johnson-Lindenstrauss in the rest (``refine``).
    ``block``: ``points`` stay where they are and go to ``z0``'s device that many at a
    time (``EmpiricalForcing``), for a training set larger than the device's memory."""
    counted = CountingModel(model)
    b, d, event = len(z0), z0[0].numel(), z0.shape[1:]
    rank = min(cfg.rank, len(points), d)
    stats = [WeightStats(per_row=cfg.method == "sketch") for _ in clamps]  # the adjoint's: per model sample

    def forward(clamp, forcing: EmpiricalForcing, stat: WeightStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        integrator = Integrator(counted, replace(settings, weight_clamp=clamp), forcing.to(z0.device, z0.dtype))
        out = integrator.run(z0, first_index=first_index, sample_ids=sample_ids)
        if stat is not None:
            for w in out.weights:
                stat.merge(w)
        return out.samples, out.psi.flatten(2).to(z0.device)

    if cfg.method == "exact":
        psis = []
        for clamp, stat in zip(clamps, stats, strict=True):
            samples, psi = forward(clamp, EmpiricalForcing(points, block=block), stat)
            psis.append(psi)  # [N, B, d]
        scores = torch.stack([p.norm(dim=-1).T for p in psis])
        _, sv, vh = torch.linalg.svd(psis[0].movedim(1, 0), full_matrices=False)
        coordinates = torch.stack([p.permute(2, 1, 0) for p in psis])  # [C, d, B, N]: on the standard basis
        return _result(samples, scores, sv[:, :rank], vh[:, :rank], True, counted, stats, event, coordinates)

    primal = Integrator(counted, settings, tape=True).run(z0, first_index=first_index, sample_ids=sample_ids)
    forcing = EmpiricalForcing(points, block=block).to(z0.device, z0.dtype)
    m = min(cfg.projections, d)
    q = orthogonal_directions(d, m, torch.Generator().manual_seed(cfg.seed), z0.dtype).to(z0.device)  # [m, d]
    omega = q[:, None].expand(m, b, d).reshape(m, *z0.shape)
    desc = f"adjoint ({m} projections)"
    proj = project(counted, primal.tape, forcing, omega, clamps, stats, desc, settings.progress,
                   settings.tangent_batch_size)  # [C, m, B, N]
    scores = proj.pow(2).sum(1).sqrt()
    if m == d:  # q is orthogonal: Psi_b = P_b^T q exactly
        psi = proj[0].movedim(0, -1) @ q  # [B, N, d]
        _, sv, vh = torch.linalg.svd(psi, full_matrices=False)
        return _result(primal.samples, scores, sv[:, :rank], vh[:, :rank], True, counted, stats, event, proj)

    def mixed(mix: torch.Tensor) -> torch.Tensor:
        return forward(clamps[0], EmpiricalForcing(points, mix=mix, block=block))[1]

    def adjoint(w: torch.Tensor) -> torch.Tensor:
        return project(counted, primal.tape, forcing, w.reshape(len(w), *z0.shape), [clamps[0]],
                       desc=f"adjoint ({len(w)} directions)", show_progress=settings.progress,
                       chunk=settings.tangent_batch_size)[0]

    width = max(1, min(rank + cfg.oversample, m // 2))  # at least half the projections estimate the rest
    _, vh = randomized_svd(proj[0, :width].movedim(0, -1), mixed, adjoint, min(rank, width), cfg.power_iterations)
    psi_v = project(counted, primal.tape, forcing, vh.movedim(1, 0).reshape(-1, *z0.shape), clamps,
                    desc=f"adjoint ({vh.shape[1]} singular directions)", show_progress=settings.progress,
                    chunk=settings.tangent_batch_size)  # [C, r, B, N]: V^T psi^n, exact
    scores, sv, vh = refine(proj, q, vh, psi_v, width)
    return _result(primal.samples, scores, sv, vh, False, counted, stats, event, proj)


def _result(samples, scores, sv, vh, exact, counted: CountingModel, stats, event, projections) -> InfluenceResult:
    return InfluenceResult(
        samples=samples.cpu(), scores=scores.cpu(), projections=projections.cpu(), singular_values=sv.cpu(),
        singular_vectors=vh.reshape(*vh.shape[:2], *event).cpu(), frobenius_sq=scores[0].pow(2).sum(-1).cpu(),
        exact=exact, network_calls=counted.calls, network_vectors=counted.vectors, weights=stats)
