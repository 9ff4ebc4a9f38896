"""The score-model interface the engine integrates against.

A score model gives ``s_t(z)`` at paper time ``t`` (a 0-d tensor) for a batch
``z`` [B, *event]; the engine asks it for the score together with ``J_z s`` applied to
several tangents in one call, and (for the adjoint of the influence computation) for
``J_z s^T`` applied to several cotangents.  The defaults do that with one
``torch.func.jvp`` or ``torch.func.vjp`` vmapped over the vectors, so the primal is
computed once and shared; closed-form models override them with exact formulas.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch.func import jvp, vjp, vmap

from diffsens_cli.core.schedule import Schedule


class ScoreModel(ABC):
    """Black-box access to a score ``s_t(z) = grad log rho_t(z)`` and its JVPs."""

    schedule: Schedule
    # The largest chunk (bytes, by ``memory_per_sample``) worth making on a CPU; None: as
    # large as memory allows.  Elementwise work on big chunks loses to cache misses there.
    cpu_chunk_bytes: int | None = None

    @abstractmethod
    def score(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score at a batch of points."""

    def score_and_jvp(self, z: torch.Tensor, t: torch.Tensor,
                      tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_t(z), J_z s_t(z) v)`` for every ``v`` in ``tangents`` [n, B, *event]."""

        def along(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(lambda x: self.score(x, t), (z,), (v,))

        return vmap(along, out_dims=(None, 0))(tangents)

    def score_and_vjp(self, z: torch.Tensor, t: torch.Tensor,
                      cotangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_t(z), J_z s_t(z)^T w)`` for every ``w`` in ``cotangents`` [n, B, *event]: one
        reverse pass per cotangent, sharing the forward pass."""
        with torch.enable_grad():
            s, pullback = vjp(lambda x: self.score(x, t), z)
            return s.detach(), vmap(pullback)(cotangents)[0].detach()

    def score_with_derivatives(self, z: torch.Tensor, t: torch.Tensor, psi: torch.Tensor | None = None,
                               probes: torch.Tensor | None = None):
        """What one integration step needs, from one evaluation: ``s``, ``J_z s psi`` [K, B,
        *event] for the sensitivity tangents ``psi`` [K, B, *event], and the Hutchinson
        terms ``e^T J_z s e`` [h, B] for the probes ``e`` [h, B, *event].  Here: one
        vmapped JVP over every tangent and probe together, sharing the primal."""
        parts = [x for x in (psi, probes) if x is not None]
        if not parts:
            return self.score(z, t), None, None
        s, jt = self.score_and_jvp(z, t, torch.cat(parts))
        quad = (probes * jt[-probes.shape[0]:]).flatten(2).sum(-1) if probes is not None else None
        return s, jt[: psi.shape[0]] if psi is not None else None, quad

    def score_trace(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact ``tr J_z s`` from the full Jacobian (one tangent per coordinate): small ``d`` only."""
        d = z[0].numel()
        basis = torch.eye(d, dtype=z.dtype, device=z.device).reshape(d, 1, *z.shape[1:]).expand(d, *z.shape)
        _, cols = self.score_and_jvp(z, t, basis)
        return cols.reshape(d, z.shape[0], d).diagonal(dim1=0, dim2=2).sum(-1)

    def memory_per_sample(self, numel: int, num_tangents: int, itemsize: int) -> int:
        """Rough bytes one sample needs in one ``score_and_jvp`` call, for choosing chunk
        sizes.  A network's activations are unknown here: this guesses 32 sample-sized
        buffers per tangent, and the engine halves the chunk if memory still runs out."""
        return itemsize * numel * (num_tangents + 1) * 32

    @property
    def has_log_density(self) -> bool:
        return False

    # The base distribution at t0 that paths start from: N(0, sigma_t0^2 I) (the alpha_t0 X
    # term is dropped); closed-form models use their exact rho_t0 instead.
    def sample_base(self, n: int, event_shape: tuple[int, ...], t0: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
        """``n`` starting points ``z0`` of shape ``event_shape``."""
        eps = torch.randn(n, *event_shape, generator=generator, dtype=t0.dtype, device=t0.device)
        return self.schedule.sigma(t0) * eps

    def base_log_density(self, z0: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        """``log rho_t0(z0)`` of the base distribution (the CCoV starting value)."""
        var = self.schedule.sigma(t0) ** 2
        return -0.5 * (z0.flatten(1) ** 2).sum(-1) / var - 0.5 * z0[0].numel() * torch.log(2 * math.pi * var)

    def log_density(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form density; use solver.density=ccov")
