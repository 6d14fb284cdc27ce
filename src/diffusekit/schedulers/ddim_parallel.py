"""DDIM with a batched, noise-free step for parallel sampling (ParaDiGMS, Shih et al., 2023): many
timesteps of one chain denoised in one call."""

from __future__ import annotations

import torch

from . import schedule_math as sm
from .ddim import DDIMScheduler
from .scheduling_utils import SchedulerOutput

DDIMParallelSchedulerOutput = SchedulerOutput


class DDIMParallelScheduler(DDIMScheduler):
    """DDIMScheduler plus ``batch_step_no_noise``: a deterministic step for each sample at its own timestep."""

    _is_ode_scheduler = True

    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                            eta: float = 0.0, use_clipped_model_output: bool = False) -> torch.Tensor:
        """One eta = 0 DDIM step per batch entry, from ``timesteps[i]`` to ``timesteps[i] - T/n``
        (a clean final alpha of 1 before t = 0)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before batch_step_no_noise")
        if eta != 0.0:
            raise ValueError(f"batch_step_no_noise adds no noise: eta must be 0, got {eta!r}")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t, alpha_prod_prev = sm.batch_alphas(self.alphas_cumprod, timesteps, stride, model_output)
        prediction_type = self.config.prediction_type
        x0 = sm.clip_denoised(sm.x0_from_alpha(model_output, sample, alpha_prod_t, prediction_type), self.config)
        eps = sm.eps_from_alpha(model_output, sample, alpha_prod_t, prediction_type)
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t**0.5 * x0) / (1 - alpha_prod_t) ** 0.5
        return sm.ddim_mean(x0, eps, alpha_prod_prev)
