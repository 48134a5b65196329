"""Noise schedules alpha(t) of the absorbing (masking) forward process.

q(x_t | x_0) keeps each token with probability alpha(t) and replaces it by the mask token
otherwise (MDLM Sec. 3). alpha(0) = 1 (clean), alpha(1) ~ 0 (all masked). The continuous-time
NELBO weights the cross-entropy of masked tokens by -alpha'(t) / (1 - alpha(t)) (MDLM Eq. 10).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from loopmdm.errors import require

# alpha(t) is floored here before taking -log alpha: schedules with alpha(1) = 0 (linear,
# cosine; loglinear with eps = 0) would otherwise give sigma = inf at t = 1.
SIGMA_ALPHA_FLOOR = 1e-6
SIGMA_MAX = -math.log(SIGMA_ALPHA_FLOOR)


class NoiseSchedule(ABC):
    name = "base"

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""

    @abstractmethod
    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - alpha(t)."""
        return 1.0 - self.alpha(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight -alpha'(t) / (1 - alpha(t)) of a masked token's cross-entropy."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma(t) = -log alpha(t) (MDLM's `total_noise`), capped at SIGMA_MAX.
        A time-conditioned DiT embeds this, not t (MDLM feeds sigma to its sigma_map)."""
        return -torch.log(self.alpha(t).clamp_min(SIGMA_ALPHA_FLOOR))


class LogLinearSchedule(NoiseSchedule):
    """MDLM's default: sigma(t) = -log(1 - (1-eps) t), so alpha(t) = 1 - (1-eps) t and the
    weight is exactly 1/t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.eps))

    def loss_weight(self, t):
        return 1.0 / t  # closed form; avoids (1-eps)/((1-eps) t) rounding

    def sigma(self, t):
        return (-torch.log1p(-(1.0 - self.eps) * t)).clamp_max(SIGMA_MAX)  # MDLM's LogLinearNoise.total_noise


class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t: the mask rate is t itself (SMDM/LLaDA's p_mask = t), weight 1/t."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return torch.full_like(t, -1.0)

    def loss_weight(self, t):
        return 1.0 / t


class CosineSchedule(NoiseSchedule):
    """MD4's cosine schedule alpha(t) = 1 - cos(pi/2 (1 - t)): masks slowly at first."""

    name = "cosine"

    def alpha(self, t):
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))


# diffusion.schedule (names.SCHEDULES) -> the schedule, given eps.
SCHEDULES = {"loglinear": LogLinearSchedule, "linear": lambda eps: LinearSchedule(), "cosine": lambda eps: CosineSchedule()}


def make_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    require(name in SCHEDULES, f"unknown noise schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](eps)
