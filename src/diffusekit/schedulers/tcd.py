"""Trajectory consistency distillation sampler (Zheng et al., 2024): LCM's schedule, with each step
landing on an intermediate point s = floor((1 - eta) * t_prev) of the trajectory before re-noising
("strategic stochastic sampling"; eta = 0 is deterministic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .lcm import LCMScheduler


@dataclass
class TCDSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step, and ``pred_noised_sample``, the estimate at the intermediate point s."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


class TCDScheduler(LCMScheduler):
    """Multistep trajectory-consistency sampling on the distillation schedule (config as LCM's)."""

    def _origin_timesteps(self, given_steps: int | None, original_steps: int, strength: float) -> np.ndarray:
        """As LCM's, except that an explicit ``original_inference_steps`` picks from every training timestep."""
        if given_steps is None:
            return super()._origin_timesteps(given_steps, original_steps, strength)
        return np.arange(0, int(self.config.num_train_timesteps * strength))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3,
             generator=None, return_dict: bool = True) -> TCDSchedulerOutput | tuple:
        """Move to the trajectory point s between t and the next timestep, then (eta > 0, except at the
        last step) re-noise from s to the next timestep."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        t = self._host_timesteps[i]
        prev_t = self._host_timesteps[i + 1] if i + 1 < len(self._host_timesteps) else 0
        s = int(torch.floor((1 - eta) * torch.tensor(prev_t)))  # float32 rounding, as the reference
        alpha_prod_t, alpha_prod_prev, alpha_prod_s = (self.alphas_cumprod[k] for k in (t, prev_t, s))
        prediction_type = self.config.prediction_type
        x0 = sm.x0_from_alpha(model_output, sample, alpha_prod_t, prediction_type)
        eps = sm.eps_from_alpha(model_output, sample, alpha_prod_t, prediction_type)
        pred_noised = alpha_prod_s.sqrt() * x0 + (1 - alpha_prod_s).sqrt() * eps
        prev_sample = pred_noised
        if eta > 0 and i != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=pred_noised.dtype)
            ratio = alpha_prod_prev / alpha_prod_s
            prev_sample = ratio.sqrt() * pred_noised + (1 - ratio).sqrt() * noise
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, pred_noised
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised)
