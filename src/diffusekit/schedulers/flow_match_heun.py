"""Heun's method for flow-matching models: each step is an Euler predictor along the predicted
velocity, then the trapezoidal corrector (two model calls per step)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import BaseOutput
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin
from .stepping import StepIndexMixin


@dataclass
class FlowMatchHeunDiscreteSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next model call."""

    prev_sample: torch.Tensor


class FlowMatchHeunDiscreteScheduler(StepIndexMixin, SchedulerMixin):
    """Second-order Heun on a shifted rectified-flow schedule: ``timesteps`` lists each inner step
    twice (predictor, corrector)."""

    _compatibles = ()
    order = 2
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        timesteps = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
                                     .copy())
        sigmas = sm.shift_sigmas(timesteps / num_train_timesteps, shift)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self.num_inference_steps = None
        self.prev_derivative = self.dt = self.sample = None
        self._reset_index()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Flow matching does not scale its input."""
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process (1 - sigma) x0 + sigma noise at the current step (looked up from ``timestep``)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sigma * noise + (1.0 - sigma) * sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``num_inference_steps`` shifted sigmas evenly spaced in t, each inner one listed twice."""
        n_train = self.config.num_train_timesteps
        self.num_inference_steps = num_inference_steps
        spaced = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps) / n_train
        sigmas = torch.from_numpy(sm.shift_sigmas(spaced, self.config.shift)).to(dtype=torch.float32, device=device)
        timesteps = sigmas * n_train
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]).cpu()
        self.prev_derivative = self.dt = self.sample = None
        self._reset_index()

    @property
    def state_in_first_order(self) -> bool:
        """True before the predictor half of a step, False before the corrector half."""
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True) -> FlowMatchHeunDiscreteSchedulerOutput | tuple:
        """The predictor (first call) or corrector (second call) half of a Heun step, with optional churn."""
        sm.reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, first = self._step_index, self.state_in_first_order
        sample = sample.to(torch.float32)
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sample, sigma_hat = sm.churn(sample, sigma, len(self.sigmas), s_churn, s_tmin, s_tmax, s_noise, generator,
                                     model_output)
        if first:
            derivative = sm.to_d(sample, sample - model_output * sigma, sigma_hat)
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma_hat, sample
            prev_sample = sample + derivative * self.dt
        else:
            derivative = 0.5 * (self.prev_derivative + sm.to_d(sample, sample - model_output * sigma_next, sigma_next))
            prev_sample = self.sample + derivative * self.dt
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev_sample)
