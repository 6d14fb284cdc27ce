"""DPM-Solver-2 ancestral sampler: k-diffusion ``sample_dpm_2_ancestral`` (DPM2 to sigma_down, then
fresh noise of size sigma_up)."""

from __future__ import annotations

import torch

from ..utils import randn_tensor
from . import schedule_math as sm
from .kdpm2 import KDPM2DiscreteScheduler
from .scheduling_utils import SchedulerOutput

KDPM2AncestralDiscreteSchedulerOutput = SchedulerOutput


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """Stochastic DPM2: the midpoint is taken towards sigma_down; noise sigma_up is added after."""

    _timed_midpoints = slice(None, -2)

    def _set_sigma_tables(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Step sigmas split into sigma_down (the deterministic target) and sigma_up (fresh noise); the
        midpoints lie between sigma and sigma_down. Returns the midpoint sigmas."""
        sigmas_next = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
        sigmas_down, sigmas_up = sm.ancestral_step(sigmas, sigmas_next)
        sigmas_down[-1] = 0.0
        sigmas_mid = sm.log_midpoint(sigmas, sigmas_down)
        sigmas_mid[-2:] = 0.0
        self.sigmas, self.sigmas_interpol = sm.repeat_inner(sigmas), sm.repeat_inner(sigmas_mid)
        self.sigmas_up, self.sigmas_down = sm.repeat_inner(sigmas_up), sm.repeat_inner(sigmas_down)
        return sigmas_mid

    def _input_sigma(self) -> torch.Tensor:
        i = self._step_index
        return self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """The step-point (first call) or midpoint (second call, adds noise) half of a DPM2-a step."""
        i = self._start_step(timestep)
        ptype = self.config.prediction_type
        if self.state_in_first_order:
            sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i]
            x0 = sm.to_denoised(model_output, sample, sigma, ptype)
            self.dt = sigma_mid - sigma
            prev_sample = sample + sm.to_d(sample, x0, sigma) * self.dt
            self.sample = sample
        else:
            sigma, sigma_mid = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            sigma_up, sigma_down = self.sigmas_up[i - 1], self.sigmas_down[i - 1]
            x0 = sm.to_denoised(model_output, sample, sigma_mid, ptype)
            prev_sample = self.sample + sm.to_d(sample, x0, sigma_mid) * (sigma_down - sigma)
            self.sample = None
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
