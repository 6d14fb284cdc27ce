"""Euler ancestral sampler: k-diffusion ``sample_euler_ancestral`` (Euler step to sigma_down, then
fresh noise of size sigma_up)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from . import schedule_math as sm
from .scheduling_utils import SchedulerOutput
from .sigma_base import SigmaSchedulerBase

EulerAncestralDiscreteSchedulerOutput = SchedulerOutput


class EulerAncestralDiscreteScheduler(SigmaSchedulerBase):
    """Stochastic Euler: each step lands at sigma_down and adds noise back up to sigma_{i+1}."""

    order = 1
    prediction_types = ("epsilon", "v_prediction")
    rejects_integer_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_tables()
        sigmas = sm.train_sigmas(self.alphas_cumprod)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy())

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose ``num_inference_steps`` timesteps spaced by the config's ``timestep_spacing``."""
        self.num_inference_steps = num_inference_steps
        timesteps = self._spaced_timesteps(num_inference_steps)
        sigmas = sm.sigmas_for_timesteps(timesteps, self.alphas_cumprod)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._reset_index()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One ancestral Euler step from sigma_i to sigma_{i+1}."""
        i = self._start_step(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)
        x0 = sm.to_denoised(model_output, sample, sigma, self.config.prediction_type)
        sigma_down, sigma_up = sm.ancestral_step(sigma, sigma_next)
        prev_sample = sample + sm.to_d(sample, x0, sigma) * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
