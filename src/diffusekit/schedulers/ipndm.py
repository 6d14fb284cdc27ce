"""Improved pseudo-numerical method (iPNDM, Zhang & Chen 2022): Adams-Bashforth steps of up to fourth
order on a trigonometric schedule, with the first steps using lower orders instead of Runge-Kutta."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..configuration import register_to_config
from .schedule_math import adams_bashforth
from .scheduling_utils import SchedulerMixin, SchedulerOutput
from .stepping import StepIndexMixin


class IPNDMScheduler(StepIndexMixin, SchedulerMixin):
    """Fourth-order iPNDM on the schedule alpha = cos(pi t / 2), sigma = sin(pi t / 2), t in (0, 1]."""

    init_noise_sigma = 1.0
    pndm_order = 4

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, trained_betas: np.ndarray | list[float] | None = None):
        self.ets: list[torch.Tensor] = []
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Evenly spaced t from 1 towards 0; ``betas`` are the sigmas and ``alphas`` the signal scales."""
        self.num_inference_steps = num_inference_steps
        steps = torch.cat([torch.linspace(1, 0, num_inference_steps + 1)[:-1], torch.tensor([0.0])])
        if self.config.trained_betas is not None:
            self.betas = torch.tensor(self.config.trained_betas, dtype=torch.float32)
        else:
            self.betas = torch.sin(steps * math.pi / 2) ** 2
        self.alphas = (1.0 - self.betas**2) ** 0.5
        self.timesteps = (torch.atan2(self.betas, self.alphas) / math.pi * 2)[:-1].to(device)
        self.ets = []
        self._reset_index()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """iPNDM takes the sample unscaled."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One Adams-Bashforth step (order grows 1..4 with the stored history)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma, alpha = self.betas[i], self.alphas[i]
        next_sigma, next_alpha = self.betas[i + 1], self.alphas[i + 1]
        self.ets = [*self.ets[-3:], sample * sigma + model_output * alpha]
        ets = adams_bashforth(self.ets)
        denoised = (sample - sigma * ets) / torch.clamp(alpha, min=1e-8)
        prev_sample = next_alpha * denoised + ets * next_sigma
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
