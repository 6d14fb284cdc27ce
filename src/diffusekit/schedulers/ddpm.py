"""DDPM (Ho et al., 2020): ancestral sampling of the trained Markov chain."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from . import schedule_math as sm
from .names import KARRAS_DIFFUSION_SCHEDULERS
from .scheduling_utils import SchedulerMixin, SchedulerOutput
from .stepping import StepIndexMixin, like_timestep

DDPMSchedulerOutput = SchedulerOutput
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
logger = logging.getLogger(__name__)


def posterior_variance(alpha_prod_t, alpha_prod_prev):
    """Variance of q(x_{t-1} | x_t, x_0): (1 - a_prev) / (1 - a_t) * beta_t, floored at 1e-20."""
    beta_t = 1 - alpha_prod_t / alpha_prod_prev
    return torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod_t) * beta_t, min=1e-20)


class DDPMScheduler(StepIndexMixin, SchedulerMixin):
    """Denoising diffusion probabilistic models sampler, with all the reference's variance types."""

    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
    order = 1
    _steps_capped_by_training = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type not in VARIANCE_TYPES:  # the reference steps with the fixed_small variance then
            logger.warning("variance_type %r is not one of %s; DDPMScheduler uses the fixed_small variance",
                           variance_type, ", ".join(VARIANCE_TYPES))
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(self.config)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._use_schedule(np.arange(num_train_timesteps)[::-1].copy())

    def _use_schedule(self, timesteps: np.ndarray, device=None) -> None:
        self._host_timesteps = [int(t) for t in timesteps] + [-1]  # -1: past the end
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        self._reset_index()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """Choose the inference timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``, or
        custom descending ``timesteps``."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps or timesteps")
        if timesteps is not None:
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError("timesteps must be in descending order")
            if timesteps[0] >= self.config.num_train_timesteps:
                raise ValueError(f"timesteps must start below num_train_timesteps ({self.config.num_train_timesteps})")
            self.custom_timesteps = True
            self._use_schedule(np.array(timesteps, dtype=np.int64), device)
            return
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or timesteps")
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False
        self._use_schedule(sm.spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                               self.config.num_train_timesteps, self.config.steps_offset), device)

    def previous_timestep(self, timestep) -> int | torch.Tensor:
        """The timestep after ``timestep`` in the schedule (-1 at the end); a tensor for a tensor
        ``timestep``, as the reference. Reads ``timestep`` on the host."""
        return like_timestep(self._host_timesteps[self.index_for_timestep(timestep) + 1], timestep)

    def _alphas_at(self, index: int):
        t, prev_t = self._host_timesteps[index], self._host_timesteps[index + 1]
        return self.alphas_cumprod[t], (self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one), t

    def _get_variance(self, t: int, predicted_variance=None, variance_type: str | None = None):
        """The step variance at timestep ``t`` (of the schedule) for ``variance_type`` (default: the config's)."""
        return self._variance_at(self.index_for_timestep(t), predicted_variance, variance_type)

    def _variance_at(self, index: int, predicted_variance=None, variance_type: str | None = None):
        alpha_prod_t, alpha_prod_prev, _ = self._alphas_at(index)
        beta_t = 1 - alpha_prod_t / alpha_prod_prev
        variance = posterior_variance(alpha_prod_t, alpha_prod_prev)
        kind = variance_type or self.config.variance_type
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if kind == "fixed_large":
            return beta_t
        if kind == "fixed_large_log":
            return torch.log(beta_t)
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta_t) + (1 - frac) * torch.log(variance)
        return variance

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One reverse step x_t -> x_{t-1}: posterior mean from the predicted x0, plus noise."""
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        alpha_prod_t, alpha_prod_prev, t = self._alphas_at(index)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        x0 = sm.x0_from_alpha(model_output, sample, alpha_prod_t, self.config.prediction_type)
        x0 = sm.clip_denoised(x0, self.config)
        prev_sample = sm.ddpm_posterior_mean(x0, sample, alpha_prod_t, alpha_prod_prev)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            variance = self._variance_at(index, predicted_variance)
            if self.variance_type == "fixed_small_log":
                prev_sample = prev_sample + variance * noise
            elif self.variance_type == "learned_range":
                prev_sample = prev_sample + torch.exp(0.5 * variance) * noise
            else:
                prev_sample = prev_sample + variance**0.5 * noise
        self._step_index = index + 1 if index + 1 < len(self.timesteps) else None
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.add_noise_alphas(original_samples, noise, timesteps, self.alphas_cumprod)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.velocity_alphas(sample, noise, timesteps, self.alphas_cumprod)
