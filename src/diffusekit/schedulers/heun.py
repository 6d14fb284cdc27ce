"""Heun sampler (Karras et al., 2022, Alg. 1): k-diffusion ``sample_heun``. Each step takes two model
calls: an Euler predictor, then the trapezoidal corrector."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import schedule_math as sm
from .scheduling_utils import SchedulerOutput
from .sigma_base import SigmaSchedulerBase

HeunDiscreteSchedulerOutput = SchedulerOutput


class HeunDiscreteScheduler(SigmaSchedulerBase):
    """Second-order Heun: ``timesteps`` lists each inner step twice (predictor, corrector)."""

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._init_tables()
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps: int | None = None,
                      timesteps: list[float] | None = None):
        """Choose ``num_inference_steps`` spaced steps or custom ``timesteps``."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and sm.sigma_kind(self.config):
            raise ValueError("custom timesteps cannot be combined with a sigma ramp")
        n = num_inference_steps or len(timesteps)
        self.num_inference_steps = n
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
            sigmas = sm.sigmas_for_timesteps(timesteps, self.alphas_cumprod)
        else:
            sigmas, timesteps = self._spaced_schedule(n, num_train_timesteps)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.from_numpy(np.asarray(timesteps))
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device, torch.float32)
        self.prev_derivative = self.dt = self.sample = None
        self._reset_index()

    @property
    def state_in_first_order(self) -> bool:
        """True before the predictor half of a step, False before the corrector half."""
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """The predictor (first call) or corrector (second call) half of a Heun step."""
        i = self._start_step(timestep)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sigma_input = sigma if first else sigma_next
        x0 = sm.to_denoised(model_output, sample, sigma_input, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = sm.to_d(sample, x0, sigma)
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            prev_sample = sample + derivative * self.dt
        else:
            derivative = (self.prev_derivative + sm.to_d(sample, x0, sigma_next)) / 2
            prev_sample = self.sample + derivative * self.dt
            self.prev_derivative = self.dt = self.sample = None
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
