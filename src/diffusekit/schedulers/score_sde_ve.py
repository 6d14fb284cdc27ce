"""Variance-exploding score SDE sampler (Song et al. 2021, arXiv:2011.13456): reverse-diffusion
predictor (``step_pred``) and Langevin corrector (``step_correct``) steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from .schedule_math import broadcast_to
from .scheduling_utils import SchedulerMixin, SchedulerOutput


@dataclass
class SdeVeOutput(BaseOutput):
    """A predictor step: the noised next sample and its mean (the final image uses the mean)."""

    prev_sample: torch.Tensor
    prev_sample_mean: torch.Tensor


class ScoreSdeVeScheduler(SchedulerMixin):
    """VE SDE with sigma(t) = sigma_min (sigma_max / sigma_min)^t, t from 1 down to ``sampling_eps``."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 2000, snr: float = 0.15, sigma_min: float = 0.01,
                 sigma_max: float = 1348.0, sampling_eps: float = 1e-5, correct_steps: int = 1):
        self.init_noise_sigma = sigma_max
        self.timesteps = None
        self.set_sigmas(num_train_timesteps, sigma_min, sigma_max, sampling_eps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The score model takes the sample unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps: int, sampling_eps: float | None = None, device=None) -> None:
        """Continuous times t in [sampling_eps, 1], descending."""
        eps = self.config.sampling_eps if sampling_eps is None else sampling_eps
        self.timesteps = torch.linspace(1, eps, num_inference_steps, device=device)

    def set_sigmas(self, num_inference_steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                   sampling_eps: float | None = None) -> None:
        """Noise levels at ``timesteps`` (``sigmas``) and on an even log grid (``discrete_sigmas``)."""
        low = self.config.sigma_min if sigma_min is None else sigma_min
        high = self.config.sigma_max if sigma_max is None else sigma_max
        if self.timesteps is None:
            self.set_timesteps(num_inference_steps, sampling_eps)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(low), math.log(high), num_inference_steps))
        self.sigmas = (low * (high / low) ** self.timesteps).cpu()

    def get_adjacent_sigma(self, timesteps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The discrete sigma one grid step below each index (0 at index 0)."""
        table = self.discrete_sigmas.to(timesteps.device)
        return torch.where(timesteps == 0, torch.zeros_like(t.to(timesteps.device)), table[timesteps - 1])

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise ValueError("timesteps are not set; call set_timesteps first")

    def step_pred(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
                  return_dict: bool = True):
        """Reverse-diffusion predictor: x <- x + (sigma_i^2 - sigma_{i-1}^2) score + sqrt(...) z."""
        self._require_timesteps()
        t = timestep * torch.ones(sample.shape[0], device=sample.device)
        index = (t * (len(self.timesteps) - 1)).long()
        sigma = self.discrete_sigmas.to(sample.device)[index]
        adjacent = self.get_adjacent_sigma(index, t).to(sample.device)
        diffusion = broadcast_to((sigma**2 - adjacent**2) ** 0.5, sample)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample_mean = sample + diffusion**2 * model_output
        prev_sample = prev_sample_mean + diffusion * noise
        if not return_dict:
            return (prev_sample, prev_sample_mean)
        return SdeVeOutput(prev_sample=prev_sample, prev_sample_mean=prev_sample_mean)

    def step_correct(self, model_output: torch.Tensor, sample: torch.Tensor, generator=None, return_dict: bool = True):
        """Langevin corrector with step size 2 (snr |z| / |score|)^2 (batch-mean norms)."""
        self._require_timesteps()
        noise = randn_tensor(sample.shape, generator=generator).to(sample.device)
        batch = sample.shape[0]
        grad_norm = torch.norm(model_output.reshape(batch, -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(batch, -1), dim=-1).mean()
        step_size = (self.config.snr * noise_norm / grad_norm) ** 2 * 2
        step_size = broadcast_to(step_size * torch.ones(batch, device=sample.device), sample)
        prev_sample_mean = sample + step_size * model_output
        prev_sample = prev_sample_mean + (step_size * 2) ** 0.5 * noise
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor | None, timesteps: torch.Tensor) -> torch.Tensor:
        """x + sigma * noise at integer indices into ``discrete_sigmas`` (fresh noise when None)."""
        sigmas = broadcast_to(self.discrete_sigmas.to(original_samples.device)[timesteps.to(original_samples.device)],
                              original_samples)
        noise = torch.randn_like(original_samples) if noise is None else noise
        return noise * sigmas + original_samples

    def __len__(self) -> int:
        return self.config.num_train_timesteps
