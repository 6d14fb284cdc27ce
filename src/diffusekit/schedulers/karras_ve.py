"""Stochastic sampler of Karras et al. 2022 (arXiv:2206.00364, Alg. 2) for variance-exploding
models: "churn" noise in, then a Heun step (``step`` + ``step_correct``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from .scheduling_utils import SchedulerMixin


@dataclass
class KarrasVeOutput(BaseOutput):
    """A Karras-VE step: the next sample, the ODE derivative used, and the x_0 estimate."""

    prev_sample: torch.Tensor
    derivative: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class KarrasVeScheduler(SchedulerMixin):
    """Geometric schedule of sigma^2 from sigma_max^2 to sigma_min^2, with churn in [s_min, s_max]."""

    order = 2

    @register_to_config
    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100, s_noise: float = 1.007, s_churn: float = 80,
                 s_min: float = 0.05, s_max: float = 50):
        self.init_noise_sigma = sigma_max
        self.num_inference_steps = None
        self.timesteps = None
        self.schedule = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model takes the sample unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Indices n-1 .. 0 and ``schedule[i] = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i / (n - 1))``."""
        if num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be at least 2, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1).to(device)
        cfg = self.config
        ratio = cfg.sigma_min**2 / cfg.sigma_max**2
        exponents = torch.arange(num_inference_steps - 1, -1, -1) / (num_inference_steps - 1)
        self.schedule = (cfg.sigma_max**2 * ratio**exponents).to(device=device, dtype=torch.float32)

    def add_noise_to_input(self, sample: torch.Tensor, sigma, generator=None):
        """Raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise; returns
        ``(sample_hat, sigma_hat)``. gamma is nonzero only for sigma in [s_min, s_max]."""
        cfg = self.config
        churn = min(cfg.s_churn / self.num_inference_steps, 2**0.5 - 1)
        if isinstance(sigma, torch.Tensor):  # decided on the device, no read-back
            gamma = torch.where((sigma >= cfg.s_min) & (sigma <= cfg.s_max), churn, 0.0)
        else:
            gamma = churn if cfg.s_min <= sigma <= cfg.s_max else 0
        eps = cfg.s_noise * randn_tensor(sample.shape, generator=generator).to(sample.device)
        sigma_hat = sigma + gamma * sigma
        sample_hat = sample + (sigma_hat**2 - sigma**2) ** 0.5 * eps
        return sample_hat, sigma_hat

    def step(self, model_output: torch.Tensor, sigma_hat, sigma_prev, sample_hat: torch.Tensor, return_dict: bool = True):
        """Euler step from sigma_hat to sigma_prev with x_0 = sample_hat + sigma_hat * model_output."""
        pred_original_sample = sample_hat + sigma_hat * model_output
        derivative = (sample_hat - pred_original_sample) / sigma_hat
        sample_prev = sample_hat + (sigma_prev - sigma_hat) * derivative
        if not return_dict:
            return (sample_prev, derivative)
        return KarrasVeOutput(prev_sample=sample_prev, derivative=derivative, pred_original_sample=pred_original_sample)

    def step_correct(self, model_output: torch.Tensor, sigma_hat, sigma_prev, sample_hat: torch.Tensor,
                     sample_prev: torch.Tensor, derivative: torch.Tensor, return_dict: bool = True):
        """Heun correction: average the derivative at sigma_hat with the one at sigma_prev."""
        pred_original_sample = sample_prev + sigma_prev * model_output
        derivative_corr = (sample_prev - pred_original_sample) / sigma_prev
        sample_prev = sample_hat + (sigma_prev - sigma_hat) * (0.5 * derivative + 0.5 * derivative_corr)
        if not return_dict:
            return (sample_prev, derivative)
        return KarrasVeOutput(prev_sample=sample_prev, derivative=derivative, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        raise NotImplementedError("KarrasVeScheduler adds noise with add_noise_to_input(sample, sigma)")
