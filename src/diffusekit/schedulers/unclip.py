"""The DDPM variant of unCLIP (Ramesh et al., 2022; Karlo): cosine betas, a ``prev_timestep`` the
pipeline chooses, and a fixed-small-log or learned-range variance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin

UNCLIP_VARIANCES = ("fixed_small_log", "learned_range")


@dataclass
class UnCLIPSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step, and the model's clean estimate ``pred_original_sample``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class UnCLIPScheduler(SchedulerMixin):
    """Ancestral DDPM steps from ``timestep`` to ``prev_timestep`` (default ``timestep - 1``)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        variance_type: str = "fixed_small_log",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        beta_schedule: str = "squaredcos_cap_v2",
    ):
        if beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"UnCLIPScheduler only supports beta_schedule='squaredcos_cap_v2', got {beta_schedule!r}")
        if variance_type not in UNCLIP_VARIANCES:
            raise ValueError(f"variance_type must be one of {', '.join(UNCLIP_VARIANCES)}, got {variance_type!r}")
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be epsilon or sample, got {prediction_type!r}")
        self.betas = sm.betas_for_alpha_bar(num_train_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.variance_type = variance_type

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """unCLIP does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``num_inference_steps`` (at least 2) timesteps evenly spaced from num_train_timesteps - 1 down to 0."""
        if num_inference_steps < 2:
            raise ValueError(f"UnCLIPScheduler needs num_inference_steps >= 2, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        ratio = (self.config.num_train_timesteps - 1) / (num_inference_steps - 1)
        self.timesteps = torch.from_numpy((np.arange(0, num_inference_steps) * ratio).round()[::-1]
                                          .astype(np.int64)).to(device)

    def _alphas(self, t: int, prev_t: int):
        """(alpha_prod_t, alpha_prod_prev, alpha, beta) of a step t -> prev_t."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        if prev_t == t - 1:
            return alpha_prod_t, alpha_prod_prev, self.alphas[t], self.betas[t]
        beta = 1 - alpha_prod_t / alpha_prod_prev
        return alpha_prod_t, alpha_prod_prev, 1 - beta, beta

    def _get_variance(self, t: int, prev_timestep: int | None = None, predicted_variance=None,
                      variance_type: str | None = None) -> torch.Tensor:
        """The step's noise scale (fixed_small_log) or log-variance (learned_range)."""
        prev_t = t - 1 if prev_timestep is None else prev_timestep
        alpha_prod_t, alpha_prod_prev, _, beta = self._alphas(t, prev_t)
        variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * beta
        if (variance_type or self.config.variance_type) == "fixed_small_log":
            return torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))
        frac = (predicted_variance + 1) / 2
        return frac * beta.log() + (1 - frac) * variance.log()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, prev_timestep=None, generator=None,
             return_dict: bool = True) -> UnCLIPSchedulerOutput | tuple:
        """Posterior mean from the predicted x0, plus noise unless ``timestep`` is 0."""
        t = int(timestep)
        prev_t = t - 1 if prev_timestep is None else int(prev_timestep)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type == "learned_range":
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        alpha_prod_t, alpha_prod_prev, alpha, beta = self._alphas(t, prev_t)
        x0 = sm.clip_denoised(sm.x0_from_alpha(model_output, sample, alpha_prod_t, self.config.prediction_type),
                              self.config)
        prev_sample = sm.ddpm_posterior_mean(x0, sample, alpha_prod_t, alpha_prod_prev, alpha, beta)
        if t > 0:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, generator=generator,
                                 device=model_output.device)
            scale = self._get_variance(t, prev_t, predicted_variance)
            if self.variance_type == "learned_range":
                scale = (0.5 * scale).exp()
            prev_sample = prev_sample + scale * noise
        if not return_dict:
            return prev_sample, x0
        return UnCLIPSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.add_noise_alphas(original_samples, noise, timesteps, self.alphas_cumprod)
