"""Neural score models: a network of ``(z, model time)`` turned into a score.

One place for what a network predicts (``Prediction``: the map to a score and the
training target), the score model around a network (``NetworkScore``), the
Fourier-feature MLP, an adapter for diffusers models that return output objects, and
the two fixes that make a diffusers UNet with attention differentiable in forward mode
(``enable_forward_ad``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffsens_cli.core.schedule import Schedule
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.errors import one_of

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "score")


@dataclass(frozen=True)
class Prediction:
    """What a network outputs at ``z = alpha x0 + sigma eps``, in diffusers' names.

    ``epsilon``: the noise ``eps``; ``sample``: the clean ``x0``; ``v_prediction``:
    diffusers' ``v = alpha eps - sigma x0``; ``score``: ``grad log rho_t(z)`` itself.
    ``to_score`` turns an output into a score (for sensitivities), ``target`` gives the
    denoising-score-matching regression target (for training), so the two cannot
    disagree.  ``alpha``, ``sigma`` may be 0-d or broadcastable against ``z``.
    """

    kind: str = "epsilon"

    def __post_init__(self):
        one_of(self.kind, PREDICTION_TYPES, "model.prediction")

    def to_score(self, out: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The score ``s_t(z)`` from the network output ``out`` at ``z``.

        v assumes a VP schedule, as diffusers does (alpha^2 + sigma^2 = 1, where
        ``eps = sigma z + alpha v``); dividing by ``alpha^2 + sigma^2`` keeps the inversion
        exact for any schedule, but a v-network only makes sense with the VP schedule it
        was trained on."""
        if self.kind == "epsilon":
            return -out / sigma
        if self.kind == "sample":
            return (alpha * out - z) / sigma**2
        if self.kind == "v_prediction":
            return -(sigma * z + alpha * out) / (sigma * (alpha**2 + sigma**2))
        return out

    def target(self, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network should output at ``z = alpha x0 + sigma eps`` (the regression target)."""
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return x0
        if self.kind == "v_prediction":
            return alpha * eps - sigma * x0
        return -eps / sigma


class NetworkScore(ScoreModel):
    """A score model around ``net(z, timestep) -> tensor like z``; the network sees the
    schedule's (fractional) model time and its output is mapped by ``prediction``.

    Training uses ``net``, ``schedule`` and ``prediction.target`` directly."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str | Prediction = "epsilon"):
        self.net, self.schedule = net, schedule
        self.prediction = prediction if isinstance(prediction, Prediction) else Prediction(prediction)

    def score(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(z, self.schedule.model_time(t).expand(z.shape[0]))
        return self.prediction.to_score(out, z, self.schedule.alpha(t), self.schedule.sigma(t))

    def evaluated_in(self, dtype: torch.dtype) -> NetworkScore:
        """The same score model with its network evaluated in ``dtype`` (a half-precision
        copy, ``HalfPrecisionNet``); everything around the network (the map to a score, the
        engine's tangents, log-densities and sensitivities) stays in the inputs' dtype."""
        return NetworkScore(HalfPrecisionNet(self.net, dtype), self.schedule, self.prediction)


class HalfPrecisionNet(nn.Module):
    """A copy of ``net`` with its weights in ``dtype`` (float16 or bfloat16): inputs (and,
    under ``torch.func.jvp``, their tangents) are cast in, outputs cast back to the inputs'
    dtype.  An explicit copy rather than ``torch.autocast``: autocast casts the weights but
    not forward-mode tangents, and a JVP through it fails on mixed dtypes (torch 2.13)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = copy.deepcopy(net).to(dtype), dtype

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.net(z.to(self.dtype), timestep).to(z.dtype)


class FourierMLP(ModelMixin, ConfigMixin):
    """MLP on ``z`` and random Fourier features of the time (paper App. F.1.2: 2 x 512,
    SiLU, 128 frequencies of scale 2).

    The features embed the time only; ``z`` enters as it is.  Fourier features of ``z``
    itself at scale 2 oscillate many times across the data (10-D: the phase has a
    standard deviation of about 40 rad) and the network does not learn the smooth
    score: on the 10-D two-Gaussian problem the loss stayed at 1.0 after 300 steps,
    against 0.06 after 1000 steps with the time embedding.  A diffusers model, so
    ``save_pretrained`` / ``from_pretrained`` work as for ``UNet2DModel``; the frequencies
    are a buffer and are saved with the weights."""

    # diffusers 0.42's ModelMixin.to warns of "modules that should be kept in float32: []"
    # on every dtype cast, even with none; this model has none, so nn.Module.to does.
    to = nn.Module.to

    @register_to_config
    def __init__(self, dim: int, hidden: int = 512, depth: int = 2, num_frequencies: int = 128,
                 fourier_scale: float = 2.0, num_train_timesteps: int = 1000, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", fourier_scale * torch.randn(num_frequencies, generator=g))
        self.time_scale = 1.0 / num_train_timesteps
        layers: list[nn.Module] = []
        width = dim + 2 * num_frequencies
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * (timestep * self.time_scale).to(z.dtype)[:, None] * self.freqs
        return self.body(torch.cat([z.flatten(1), phase.sin(), phase.cos()], 1)).view_as(z)


class UNetAdapter(nn.Module):
    """``net(z, timestep) -> tensor`` for a diffusers model that returns an output
    object (``UNet2DModel`` returns one with ``.sample``); the model is ``.model``.
    A class-conditional model is asked, for every sample, for ``class_label``."""

    def __init__(self, model: nn.Module, class_label: int | None = None):
        super().__init__()
        self.model = model
        self.class_label = class_label

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.class_label is None:
            return self.model(z, timestep, return_dict=False)[0]
        labels = torch.full((z.shape[0],), self.class_label, dtype=torch.long, device=z.device)
        return self.model(z, timestep, class_labels=labels, return_dict=False)[0]


class MatmulAttnProcessor:
    """diffusers self-attention as ``softmax(Q K^T * scale) V`` with plain matmuls.

    diffusers' default ``AttnProcessor2_0`` calls ``F.scaled_dot_product_attention``,
    whose fused kernels have no forward-mode AD (torch 2.13); its classic
    ``AttnProcessor`` upcasts the softmax of a float64 model to float32.  This one keeps
    the model's dtype (upcasting only below float32, as the fused kernels do) and is
    otherwise the same computation as ``AttnProcessor2_0`` for the self-attention blocks
    of ``UNet2DModel``."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None):
            raise NotImplementedError("MatmulAttnProcessor covers plain self-attention (UNet2DModel) only")
        residual, shape = hidden_states, hidden_states.shape
        x = hidden_states.flatten(2) if hidden_states.ndim == 4 else hidden_states.transpose(1, 2)  # [B, C, L]
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        x = x.transpose(1, 2)  # [B, L, C]
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        batch, length, inner = k.shape
        heads = [y.view(batch, length, attn.heads, inner // attn.heads).transpose(1, 2) for y in (q, k, v)]
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = (y.to(dtype) for y in heads)
        out = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v
        out = out.to(x.dtype).transpose(1, 2).reshape(batch, length, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(shape) if len(shape) == 4 else out
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ContiguousGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` on a contiguous copy of its input: GroupNorm's forward-mode AD
    views the tangent and fails on the non-contiguous tensors the attention blocks
    return ("view size is not compatible with input tensor's size and stride")."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def enable_forward_ad(net: nn.Module) -> nn.Module:
    """Make ``net`` (e.g. a UNet with attention) differentiable by ``torch.func.jvp``,
    also under ``vmap``: plain-matmul attention and contiguous GroupNorm inputs.  Same
    outputs, same weights and state dict; idempotent.  For the score model used for
    sensitivities; training may keep the faster default kernels."""
    for m in net.modules():
        if isinstance(m, Attention):
            m.set_processor(MatmulAttnProcessor())
        elif type(m) is nn.GroupNorm:
            m.__class__ = ContiguousGroupNorm
    return net


def disable_forward_ad(net: nn.Module) -> nn.Module:
    """Undo ``enable_forward_ad``: diffusers' default (fused) attention and plain GroupNorm."""
    for m in net.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0() if m.scale_qk else AttnProcessor())
        elif type(m) is ContiguousGroupNorm:
            m.__class__ = nn.GroupNorm
    return net
