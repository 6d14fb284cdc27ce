"""Variance-preserving score SDE (Song et al. 2021): Euler-Maruyama steps of the reverse SDE with a
linear beta(t) from beta_min to beta_max."""

from __future__ import annotations

import math

import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from .schedule_math import broadcast_to
from .scheduling_utils import SchedulerMixin


class ScoreSdeVpScheduler(SchedulerMixin):
    """VP SDE sampler; ``step_pred(score, x, t)`` returns ``(x, x_mean)``."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 2000, beta_min: float = 0.1, beta_max: float = 20,
                 sampling_eps: float = 1e-3):
        self.sigmas = None
        self.discrete_sigmas = None
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Continuous times t from 1 down to ``sampling_eps``."""
        self.timesteps = torch.linspace(1, self.config.sampling_eps, num_inference_steps, device=device)

    def step_pred(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor, generator=None):
        """One reverse Euler-Maruyama step; ``score`` is the model's eps-like output (divided by -std)."""
        if self.timesteps is None:
            raise ValueError("timesteps are not set; call set_timesteps first")
        beta_min, beta_max = self.config.beta_min, self.config.beta_max
        log_mean_coeff = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        std = broadcast_to(torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff)), score)
        score = -score / std
        dt = -1.0 / len(self.timesteps)
        beta_t = broadcast_to(beta_min + t * (beta_max - beta_min), x)
        diffusion = torch.sqrt(beta_t)
        drift = -0.5 * beta_t * x - diffusion**2 * score
        x_mean = x + drift * dt
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x_mean + diffusion * math.sqrt(-dt) * noise, x_mean

    def __len__(self) -> int:
        return self.config.num_train_timesteps
