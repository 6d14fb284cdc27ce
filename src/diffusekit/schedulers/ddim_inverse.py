"""Inverted DDIM (Mokady et al., 2022; Wallace et al., 2022): the deterministic DDIM update run
from clean to noisy, to recover the noise latents an image came from."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..configuration import register_to_config
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin, SchedulerOutput

INVERSE_SPACINGS = ("leading", "trailing")


class DDIMInverseScheduler(SchedulerMixin):
    """DDIM with eta = 0, stepping up the schedule: each step goes from t - T/n to t."""

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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs: Any,  # accepted and unused, as the reference (DDIM options such as thresholding)
    ):
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(self.config)
        # alpha_bar "before" t=0, where the inversion starts: 1 (a clean sample) or alphas_cumprod[0]
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps, dtype=torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDIM does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``num_inference_steps`` ascending timesteps, spaced "leading" or "trailing"."""
        spacing = self.config.timestep_spacing
        if spacing not in INVERSE_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(INVERSE_SPACINGS)} for "
                             f"DDIMInverseScheduler, got {spacing!r}")
        self.num_inference_steps = num_inference_steps
        descending = sm.spaced_timesteps(spacing, num_inference_steps, self.config.num_train_timesteps,
                                         self.config.steps_offset)
        self.timesteps = torch.from_numpy(descending[::-1].copy()).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One inverted DDIM step to ``timestep`` from the timestep T/n below it."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        cfg = self.config
        target = int(timestep)
        source = min(target - cfg.num_train_timesteps // self.num_inference_steps, cfg.num_train_timesteps - 1)
        alpha_prod_t = self.alphas_cumprod[source] if source >= 0 else self.initial_alpha_cumprod
        alpha_prod_next = self.alphas_cumprod[target]
        x0 = sm.clip_denoised(sm.x0_from_alpha(model_output, sample, alpha_prod_t, cfg.prediction_type), cfg)
        eps = sm.eps_from_alpha(model_output, sample, alpha_prod_t, cfg.prediction_type)
        next_sample = sm.ddim_mean(x0, eps, alpha_prod_next)
        if not return_dict:
            return next_sample, x0
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=x0)
