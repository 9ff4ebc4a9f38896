"""D-TRAK: TRAK data attribution with the output function of diffusion models (docs/design.md section 12).

TRAK (Park et al., ICML 2023) scores a training image ``x_n`` for a query ``z`` by
``phi(z)^T (Phi^T Phi + lambda I)^-1 phi(x_n)``, with ``phi(x) = R^T grad_theta f(theta; x)``
a random projection of the gradient of an output function and ``Phi`` [N, k] the training
images' features.  D-TRAK (Zheng et al., ICLR 2024, "Intriguing properties of data
attribution on diffusion models"; code sail-sg/D-TRAK) found that for diffusion models a
function other than the training loss works better: the squared norm of the predicted
noise, ``f(theta; x) = mean_j |eps_theta(alpha_j x + sigma_j eps_j, t_j)|^2`` over a fixed
set of times and noises.

Everything here is a fixed function of its settings: the same (time, noise) pairs for
every image, and a projection generated in chunks of rows from seeded CPU generators, so
features do not depend on the device, on how the images are batched, or on which job
computed them.  The projection is never held whole: ``P x k`` signs for a UNet of a million
parameters would take gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from diffsens_cli import interrupt, progress
from diffsens_cli.core.keyed_random import keyed_generator
from diffsens_cli.core.schedule import Schedule


class _ToScore(Protocol):
    def to_score(self, out: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor,
                 sigma: torch.Tensor) -> torch.Tensor: ...


class NetworkModel(Protocol):
    """What D-TRAK needs of a score model: its network and how the output becomes a score
    (``models.network.NetworkScore``; core cannot import it)."""

    net: nn.Module
    schedule: Schedule
    prediction: _ToScore


@dataclass(frozen=True)
class DTrakSettings:
    """D-TRAK's settings (Zheng et al. 2024, with TRAK's features and kernel).

    Output function of an image ``x`` under parameters ``theta``, over ``J = timesteps *
    noises`` fixed pairs ``(t_j, eps_j)`` (``output_pairs``)::

        f(theta; x) = (1/J) sum_j |eps_hat_theta(alpha_j x + sigma_j eps_j, t_j)|^2

    (mean over pairs, sum over pixels; D-TRAK's code takes the mean over pixels, a constant
    factor that ``damping``, being relative, absorbs).  Features ``phi(x) = R^T grad_theta
    f(theta; x)`` with ``R`` [P, projection_dim] of signs ``+-1/sqrt(k)`` (``random_projection``;
    D-TRAK uses TRAK's Gaussian projection, k = 32768).  Scores of training image n for a
    query z: ``phi(z)^T (Phi^T Phi + lambda I)^-1 phi(x_n)`` (``trak_scores``) with ``lambda =
    damping * tr(Phi^T Phi) / k`` (``relative_damping``; not from the paper: D-TRAK adds an
    absolute 0.5 to its features' Gram matrix).

    ``seed`` fixes the noises and the projection; ``chunk_rows`` is part of the projection's
    definition (each chunk of rows has its own generator), so training and query features
    must share it.  ``batch_size`` images go through one vmapped gradient and one pass over
    the projection: it sets memory and speed only."""

    timesteps: int = 10
    noises: int = 1
    projection_dim: int = 2048
    damping: float = 1e-3
    batch_size: int = 64
    chunk_rows: int = 4096
    seed: int = 0

    def __post_init__(self):
        for name in ("timesteps", "noises", "projection_dim", "batch_size", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"DTrakSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.damping < 0:
            raise ValueError(f"DTrakSettings.damping must be >= 0, got {self.damping}")


def output_pairs(timesteps: int, noises: int, event_shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (paper time, noise) pairs of the output function, shared by every image: times
    [J] at diffusion times ``tau_j = (j + 0.5) / timesteps`` (``t = 1 - tau``), each repeated
    for ``noises`` standard normal noises [J, *event_shape].  The noises come from a CPU
    generator seeded by ``seed``, in float64, then are cast and moved: the same on every
    device and in every dtype up to rounding."""
    tau = (torch.arange(timesteps, dtype=torch.float64) + 0.5) / timesteps
    times = (1 - tau).repeat_interleave(noises)
    noise = torch.randn(len(times), *event_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return times.to(device, dtype), noise.to(device, dtype)


def dtrak_output(model: NetworkModel, images: torch.Tensor, times: torch.Tensor, noise: torch.Tensor,
                 params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``f(theta; x_n)`` [B] for images [B, *event]: the mean over the pairs ``(times[j],
    noise[j])`` of ``|eps_hat|^2`` summed over pixels, with ``eps_hat = -sigma s_theta(z, t)``
    (so any prediction type counts the noise it implies).  One network call on all B*J
    points.  ``params`` replaces the network's parameters of those names (for
    ``torch.func``); None: the network's own, differentiable by autograd."""
    b, j = len(images), len(times)
    shape = (1, j) + (1,) * (images.ndim - 1)
    alpha, sigma = model.schedule.alpha(times).view(shape), model.schedule.sigma(times).view(shape)
    z = alpha * images[:, None] + sigma * noise  # [B, J, *event]
    out = functional_call(model.net, params or {}, (z.flatten(0, 1), model.schedule.model_time(times).repeat(b)))
    eps_hat = -sigma * model.prediction.to_score(out.reshape(z.shape), z, alpha, sigma)
    return eps_hat.pow(2).flatten(2).sum(-1).mean(-1)


def trainable_parameters(net: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that count (``requires_grad``), detached, in ``named_parameters`` order:
    the order of the flattened gradients."""
    return {name: p.detach() for name, p in net.named_parameters() if p.requires_grad}


def per_example_gradients(model: NetworkModel, images: torch.Tensor, times: torch.Tensor,
                          noise: torch.Tensor) -> torch.Tensor:
    """``grad_theta f(theta; x_n)`` [B, P] for images [B, *event], flattened over the
    trainable parameters in ``named_parameters`` order: ``vmap(grad(f))`` over the images
    (on the digits UNet on 2 CPU cores up to 2x faster than a loop of backward passes once
    warm; on a GPU one batched pass).  Works inside ``torch.no_grad``."""
    params = trainable_parameters(model.net)

    def one(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return dtrak_output(model, x[None], times, noise, p)[0]

    grads = vmap(grad(one), in_dims=(None, 0))(params, images)
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def random_projection(grads: torch.Tensor, dim: int, seed: int, chunk_rows: int) -> torch.Tensor:
    """``grads @ R`` [B, dim] for flattened gradients [B, P], with ``R`` [P, dim] of
    independent signs ``+-1/sqrt(dim)`` (so ``E[R R^T] = I``; Johnson-Lindenstrauss).

    ``R`` is generated chunk by chunk: rows ``[c * chunk_rows, (c + 1) * chunk_rows)`` come
    from ``core.keyed_random.keyed_generator("projection", seed, c)``, as random bytes (8 signs
    each: 8x fewer draws than one per sign) that move to the gradients' device and are
    unpacked there.  ``R`` is a fixed function of ``(seed, P, dim, chunk_rows)``: the same
    for every batch of images and every device; ``grads = I`` gives ``R`` itself.  Memory
    beyond the gradients and the result: one chunk, reused, of ``chunk_rows * dim`` numbers of
    the gradients' dtype, plus ``chunk_rows * dim / 8`` random bytes and as many int64
    indices.  Cost: ``P * dim`` random bits per call (large batches amortise them) and the
    ``B x P x dim`` product."""
    p = grads.shape[1]
    width = -(-dim // 8)
    # table[b] = the signs of the 8 bits of byte b.  Unpacking by lookup into one reused
    # buffer: on a CPU, fresh chunk-sized tensors cost more in page faults than the work.
    table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1) * 2 - 1
    table = table.to(grads.device, grads.dtype)
    buffer = torch.empty(min(chunk_rows, p) * width, 8, dtype=grads.dtype, device=grads.device)
    out = torch.zeros(len(grads), dim, dtype=grads.dtype, device=grads.device)
    for c, start in enumerate(range(0, p, chunk_rows)):
        rows = min(chunk_rows, p - start)
        generator = keyed_generator("projection", seed, c)
        packed = torch.randint(0, 256, (rows * width,), generator=generator, dtype=torch.uint8)
        signs = torch.index_select(table, 0, packed.to(grads.device, torch.int64), out=buffer[:rows * width])
        out.addmm_(grads[:, start:start + rows], signs.view(rows, width * 8)[:, :dim])
    return out / math.sqrt(dim)


def trak_features(model: NetworkModel, images: torch.Tensor, settings: DTrakSettings,
                  show_progress: bool = False) -> torch.Tensor:
    """D-TRAK features ``phi(x_n) = R^T grad_theta f(theta; x_n)`` [N, projection_dim] of
    images [N, *event], in the network's dtype and on its device (the kernel works in
    float64 itself), ``settings.batch_size`` images at a time (a bar over them if
    ``show_progress``; an interrupt stops between batches)."""
    first = next(p for p in model.net.parameters() if p.requires_grad)
    dtype, device = first.dtype, first.device
    times, noise = output_pairs(settings.timesteps, settings.noises, tuple(images.shape[1:]),
                                settings.seed, dtype, device)
    features = torch.empty(len(images), settings.projection_dim, dtype=dtype, device=device)
    starts = range(0, len(images), settings.batch_size)
    for start in progress.bar(starts, desc="dtrak: gradient features", enabled=show_progress, leave=False):
        interrupt.check()
        batch = images[start:start + settings.batch_size].to(device, dtype)
        grads = per_example_gradients(model, batch, times, noise)
        features[start:start + len(batch)] = random_projection(grads, settings.projection_dim, settings.seed,
                                                                settings.chunk_rows)
    return features


def relative_damping(train: torch.Tensor, damping: float) -> float:
    """``lambda = damping * tr(Phi^T Phi) / k`` for training features ``Phi`` [N, k]: damping
    relative to the mean eigenvalue of ``Phi^T Phi`` (over all k, zeros included), so that
    it does not depend on the features' scale (the output function's normalisation, the
    number of pixels, the projection's)."""
    return damping * float(train.double().pow(2).sum()) / train.shape[1]


def trak_scores(train: torch.Tensor, query: torch.Tensor, lam: float, gram: bool | None = None) -> torch.Tensor:
    """TRAK scores ``phi (Phi^T Phi + lam I)^-1 Phi^T`` [M, N] of queries ``phi`` [M, k]
    against training features ``Phi`` [N, k], in float64 with a Cholesky solve.

    ``gram``: solve with the k x k matrix ``Phi^T Phi + lam I`` (False) or the N x N matrix
    ``Phi Phi^T + lam I`` (True), the same scores by the push-through identity
    ``(Phi^T Phi + lam I)^-1 Phi^T = Phi^T (Phi Phi^T + lam I)^-1``; None: the smaller.
    ``lam`` is absolute (``relative_damping`` makes one); 0 needs the chosen matrix
    positive definite (k <= N features, or N <= k images, of full rank)."""
    phi_train, phi = train.double(), query.double()
    n, k = phi_train.shape
    use_gram = n < k if gram is None else gram
    if use_gram:  # scores = (phi Phi^T) (Phi Phi^T + lam I)^-1
        matrix, rhs = phi_train @ phi_train.T, phi_train @ phi.T
    else:  # scores = ((Phi^T Phi + lam I)^-1 phi^T)^T Phi^T
        matrix, rhs = phi_train.T @ phi_train, phi.T
    factor = torch.linalg.cholesky(matrix + lam * torch.eye(len(matrix), dtype=torch.float64, device=phi.device))
    solved = torch.cholesky_solve(rhs, factor).T
    return solved if use_gram else solved @ phi_train.T
