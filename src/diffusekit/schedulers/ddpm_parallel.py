"""DDPM with a batched, noise-free step for parallel sampling (ParaDiGMS, Shih et al., 2023)."""

from __future__ import annotations

import torch

from . import schedule_math as sm
from .ddpm import DDPMScheduler
from .scheduling_utils import SchedulerOutput

DDPMParallelSchedulerOutput = SchedulerOutput


class DDPMParallelScheduler(DDPMScheduler):
    """DDPMScheduler plus ``batch_step_no_noise``: the posterior mean for each sample at its own timestep."""

    _is_ode_scheduler = False

    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps: torch.Tensor,
                            sample: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_prev | x_t, x0) per batch entry, from ``timesteps[i]`` to ``timesteps[i] - T/n``
        (``n`` = num_train_timesteps before ``set_timesteps``; a clean alpha of 1 before t = 0)."""
        steps = self.num_inference_steps or self.config.num_train_timesteps
        stride = self.config.num_train_timesteps // steps
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]  # drop the predicted variance channels
        alpha_prod_t, alpha_prod_prev = sm.batch_alphas(self.alphas_cumprod, timesteps, stride, model_output)
        x0 = sm.x0_from_alpha(model_output, sample, alpha_prod_t, self.config.prediction_type)
        return sm.ddpm_posterior_mean(sm.clip_denoised(x0, self.config), sample, alpha_prod_t, alpha_prod_prev)
