"""The stateful shell shared by the k-diffusion style samplers (Euler, Euler ancestral, Heun, LMS,
DPM2): a variance-exploding view of a DDPM, x_sigma = x0 + sigma * noise, with the model input
scaled by 1 / sqrt(sigma^2 + 1).

Sigmas stay on the CPU (as in the reference) and are indexed with the Python ``step_index``, so a
step never reads a device tensor back.
"""

from __future__ import annotations

import numpy as np
import torch

from . import schedule_math as sm
from .names import KARRAS_DIFFUSION_SCHEDULERS
from .scheduling_utils import SchedulerMixin
from .stepping import StepIndexMixin


def unit_variance_input(sample: torch.Tensor, sigma) -> torch.Tensor:
    """The model input of a variance-exploding sample: x / sqrt(sigma^2 + 1)."""
    return sample / (sigma**2 + 1) ** 0.5


class SigmaSchedulerBase(StepIndexMixin, SchedulerMixin):
    """Training tables, spaced sigma schedules, input scaling and ``add_noise`` for sigma samplers."""

    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
    sigmas: torch.Tensor
    #: prediction types the subclass can step with
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    #: whether ``step`` refuses integer timesteps (likely loop indices) as the reference's Euler does
    rejects_integer_timesteps = False

    def _init_tables(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in self.prediction_types:
            raise ValueError(f"prediction_type must be one of {self.prediction_types} for {type(self).__name__}, "
                             f"got {cfg.prediction_type!r}")
        sm.sigma_kind(cfg)  # rejects more than one sigma ramp
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(cfg, finite_last_sigma=True)
        self.num_inference_steps = None
        self._reset_index()

    def _spaced_timesteps(self, n: int, num_train_timesteps: int | None = None) -> np.ndarray:
        """n fractional timesteps spaced by the config's ``timestep_spacing`` (float32, descending)."""
        cfg = self.config
        return sm.spaced_timesteps(cfg.timestep_spacing, n, num_train_timesteps or cfg.num_train_timesteps,
                                   cfg.steps_offset, dtype=np.float32, round_linspace=False)

    def _spaced_schedule(self, n: int, num_train_timesteps: int | None = None,
                         sigma_min: float | None = None, sigma_max: float | None = None):
        """``(sigmas, timesteps)`` (numpy, without the final sigma) for n spaced steps, resampled by
        the config's sigma ramp."""
        timesteps = self._spaced_timesteps(n, num_train_timesteps)
        sigmas = sm.sigmas_for_timesteps(timesteps, self.alphas_cumprod)
        return self._ramp(sigmas, timesteps, n, sigma_min, sigma_max)

    def _ramp(self, sigmas, timesteps, n: int, sigma_min=None, sigma_max=None):
        return sm.resample_sigmas(sm.sigma_kind(self.config), sigmas, timesteps, self.alphas_cumprod, n,
                                  sigma_min, sigma_max)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def _input_sigma(self) -> torch.Tensor:
        return self.sigmas[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Scale the sample to unit variance for the model: x / sqrt(sigma^2 + 1)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return unit_variance_input(sample, self._input_sigma())

    def _start_step(self, timestep) -> int:
        if self.rejects_integer_timesteps:
            sm.reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma * noise at the schedule positions of ``timesteps``."""
        return sm.add_noise_sigmas(original_samples, noise, self.sigmas,
                                   self._noise_indices(timesteps, original_samples.device))
