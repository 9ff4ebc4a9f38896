"""Noise schedules: the one place where alpha_t, sigma_t and their derivatives live.

Paper time ``t`` runs from ``t0 = 0`` (noise) to ``t1 = 1`` (data); diffusion time is
``tau = 1 - t``.  A family only defines ``log alpha(tau)`` and ``sigma^2(tau)``; every
derivative (and so the velocity coefficients ``a_t``, ``c_t`` of docs/design.md section 2)
comes from forward-mode AD of those two functions, so the families cannot disagree
with their own derivatives.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.func import jvp


@dataclass(frozen=True)
class Coefficients:
    """Schedule values at one paper time ``t`` (0-d tensors)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    a: torch.Tensor  # alpha'_t / alpha_t
    c: torch.Tensor  # a_t sigma_t^2 - sigma_t sigma'_t


class Schedule(ABC):
    """A diffusion schedule in paper time; ``num_train_timesteps`` maps to model time."""

    num_train_timesteps: int = 1000

    @abstractmethod
    def log_alpha_tau(self, tau: torch.Tensor) -> torch.Tensor:
        """log alpha as a function of diffusion time."""

    @abstractmethod
    def sigma2_tau(self, tau: torch.Tensor) -> torch.Tensor:
        """sigma^2 as a function of diffusion time."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.log_alpha_tau(1 - t).exp()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma2_tau(1 - t).sqrt()

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        """alpha, sigma, a = d log alpha/dt and c = a sigma^2 - (1/2) d sigma^2/dt at ``t``."""
        tau = 1 - t
        one = torch.ones_like(tau)
        log_alpha, dlog_alpha_dtau = jvp(self.log_alpha_tau, (tau,), (one,))
        sigma2, dsigma2_dtau = jvp(self.sigma2_tau, (tau,), (one,))
        a = -dlog_alpha_dtau
        c = a * sigma2 + 0.5 * dsigma2_dtau
        return Coefficients(alpha=log_alpha.exp(), sigma=sigma2.sqrt(), a=a, c=c)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) training timestep a network sees: ``n = N tau - 1``."""
        return self.num_train_timesteps * (1 - t) - 1


class VPLinear(Schedule):
    """Continuous VP schedule of a linear DDPM: ``beta(tau) = N (b0 + tau (b1 - b0))``."""

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000):
        self.beta_start, self.beta_end = beta_start, beta_end
        self.num_train_timesteps = num_train_timesteps

    def log_alpha_tau(self, tau: torch.Tensor) -> torch.Tensor:
        n, b0, b1 = self.num_train_timesteps, self.beta_start, self.beta_end
        return -0.5 * n * (b0 * tau + 0.5 * (b1 - b0) * tau**2)

    def sigma2_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(2 * self.log_alpha_tau(tau))


class VPDiscrete(Schedule):
    """A discrete ``DDPMScheduler`` (linear by default) made continuous (docs/design.md section 1).

    ``scheduler_config`` is the diffusers config that reproduces the betas (what a saved
    model writes).  The constructor's linear betas are float64; diffusers' (and so
    ``models.pretrained.schedule_from_scheduler_config``'s) are float32, which moves ``alphabar`` by less
    than 1e-6 relative (2.3e-7 for the default).

    ``tau = (n + 1) / N``; ``log alphabar`` is interpolated linearly in ``n`` (with
    ``log alphabar_{-1} = 0`` at ``tau = 0``), so ``beta(tau)`` is piecewise constant
    and alpha, sigma, beta stay mutually consistent.
    """

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000):
        self._set_betas(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64),
                        {"beta_start": beta_start, "beta_end": beta_end, "num_train_timesteps": num_train_timesteps,
                         "beta_schedule": "linear"})

    @classmethod
    def from_betas(cls, betas: torch.Tensor, scheduler_config: Mapping | None = None) -> VPDiscrete:
        """The schedule of any discrete ``betas`` (one per training timestep, each in (0, 1));
        ``scheduler_config``: the diffusers scheduler config they came from, if any."""
        schedule = cls.__new__(cls)
        schedule._set_betas(torch.as_tensor(betas, dtype=torch.float64), scheduler_config)
        return schedule

    def _set_betas(self, betas: torch.Tensor, scheduler_config: Mapping | None) -> None:
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        self.num_train_timesteps = len(betas)
        log_alphabar = torch.cumsum(torch.log1p(-betas), 0)
        self._table = torch.cat([torch.zeros(1, dtype=torch.float64), log_alphabar])

    def log_alpha_tau(self, tau: torch.Tensor) -> torch.Tensor:
        table = self._table.to(device=tau.device, dtype=tau.dtype)
        pos = (self.num_train_timesteps * tau).clamp(0, self.num_train_timesteps)
        lo = pos.detach().floor().clamp(max=self.num_train_timesteps - 1).long()
        frac = pos - lo
        return 0.5 * (table[lo] * (1 - frac) + table[lo + 1] * frac)

    def sigma2_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(2 * self.log_alpha_tau(tau))


class SubVP(VPLinear):
    """Sub-VP schedule (Song et al. 2021): VP's alpha, ``sigma^2 = (1 - alphabar)^2``."""

    def sigma2_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.expm1(2 * self.log_alpha_tau(tau)) ** 2


class VE(Schedule):
    """Variance-exploding schedule: ``alpha = 1``, ``sigma = s_min (s_max / s_min)^tau``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, num_train_timesteps: int = 1000):
        self.log_min, self.log_max = math.log(sigma_min), math.log(sigma_max)
        self.num_train_timesteps = num_train_timesteps

    def log_alpha_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tau)

    def sigma2_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.exp(2 * (self.log_min + tau * (self.log_max - self.log_min)))


class EDM(Schedule):
    """EDM-style schedule (Karras et al. 2022) in unit time: ``alpha = 1``, ``sigma = s_max tau``."""

    def __init__(self, sigma_max: float = 80.0, num_train_timesteps: int = 1000):
        self.sigma_max = sigma_max
        self.num_train_timesteps = num_train_timesteps

    def log_alpha_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tau)

    def sigma2_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return (self.sigma_max * tau) ** 2


SCHEDULES: dict[str, type[Schedule]] = {
    "vp_linear": VPLinear,
    "vp_discrete": VPDiscrete,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
}


SPACINGS = ("uniform", "log_snr", "karras")
KARRAS_RHO = 7.0  # EDM's sampler grid (Karras et al. 2022, Eq. 5): uniform in (sigma/alpha)^(1/rho)


def grid_times(schedule: Schedule, t0: float, t1: float, num_steps: int, spacing: str = "uniform") -> torch.Tensor:
    """The ``num_steps + 1`` grid times from ``t0`` to ``t1`` (float64): uniform in paper
    time; uniform in the log signal-to-noise ratio ``log(alpha^2 / sigma^2)``, which puts
    the steps where the score changes fastest (small sigma, near the data); or EDM's
    ``karras`` grid, uniform in ``(sigma / alpha)^(1/7)`` (denser still near the data)."""
    if spacing == "uniform":
        return torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64)
    if spacing == "karras":
        ends = torch.tensor([t0, t1], dtype=torch.float64)
        root = (schedule.sigma(ends) / schedule.alpha(ends)) ** (1 / KARRAS_RHO)
        targets = torch.linspace(root[0].item(), root[1].item(), num_steps + 1, dtype=torch.float64) ** KARRAS_RHO
        times = _noise_ratio_times(schedule, t0, t1, targets)
    elif spacing == "log_snr":
        fine = torch.linspace(t0, t1, 200_001, dtype=torch.float64)
        lam = 2 * (schedule.alpha(fine).log() - schedule.sigma(fine).log())  # increasing in t
        targets = torch.linspace(lam[0].item(), lam[-1].item(), num_steps + 1, dtype=torch.float64)
        i = torch.searchsorted(lam, targets).clamp(1, len(fine) - 1)
        frac = (targets - lam[i - 1]) / (lam[i] - lam[i - 1])
        times = fine[i - 1] + frac * (fine[i] - fine[i - 1])
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    times[0], times[-1] = t0, t1
    return times


def _noise_ratio_times(schedule: Schedule, t0: float, t1: float, targets: torch.Tensor) -> torch.Tensor:
    """The times in [t0, t1] where ``sigma / alpha`` (decreasing in t) takes the values ``targets``:
    bisection to float64 resolution."""
    lo = torch.full_like(targets, t0)
    hi = torch.full_like(targets, t1)
    for _ in range(64):
        mid = (lo + hi) / 2
        above = schedule.sigma(mid) / schedule.alpha(mid) > targets
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def time_grid(t_min: float, num_steps: int | None, step_size: float | None) -> tuple[float, float, int]:
    """Integration interval ``[0, 1 - t_min]`` in paper time and its number of uniform steps.

    ``t_min`` is the truncation in diffusion time; a ``step_size`` is rounded to the
    nearest whole number of steps over the interval.
    """
    t1 = 1.0 - t_min
    if num_steps is None:
        num_steps = max(1, round(t1 / step_size))
    return 0.0, t1, int(num_steps)
