"""Multistep sampling of consistency models (Song et al., 2023, Alg. 1): denoise with the
consistency function, then re-noise to the next (Karras) noise level."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin
from .stepping import StepIndexMixin

logger = logging.getLogger(__name__)


@dataclass
class CMStochasticIterativeSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step."""

    prev_sample: torch.Tensor


class CMStochasticIterativeScheduler(StepIndexMixin, SchedulerMixin):
    """Consistency-model sampling on a Karras ramp of ``num_train_timesteps`` discretisation points."""

    order = 1
    _steps_capped_by_training = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
    ):
        self.init_noise_sigma = sigma_max
        sigmas = self._karras(np.linspace(0, 1, num_train_timesteps))
        self.num_inference_steps = None
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(self.sigma_to_t(sigmas))
        self.custom_timesteps = False
        self.is_scale_input_called = False
        self._reset_index()

    def _karras(self, ramp: np.ndarray) -> np.ndarray:
        cfg = self.config
        return sm.karras_at(ramp, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    def sigma_to_t(self, sigmas) -> np.ndarray:
        """The model's time input for noise levels ``sigmas``: 250 log(sigma)."""
        return 1000 * 0.25 * np.log(np.asarray(sigmas, dtype=np.float64) + 1e-44)

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + sigma_data^2) for the model."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / (sigma**2 + self.config.sigma_data**2) ** 0.5

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: list[int] | None = None) -> None:
        """``num_inference_steps`` evenly ("leading") spaced discretisation points, or custom
        descending integer ``timesteps`` below num_train_timesteps."""
        n_train = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError("timesteps must be in descending order")
            if timesteps[0] >= n_train:
                raise ValueError(f"timesteps must start below num_train_timesteps ({n_train})")
            points = np.array(timesteps, dtype=np.int64)
        else:
            self.num_inference_steps = num_inference_steps
            points = sm.spaced_timesteps("leading", num_inference_steps, n_train)
        self.custom_timesteps = timesteps is not None
        sigmas = self._karras(points[::-1] / (n_train - 1))
        self.timesteps = torch.from_numpy(self.sigma_to_t(sigmas)).to(device=device)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [self.config.sigma_min]]).astype(np.float32))
        self._reset_index()

    def get_scalings(self, sigma):
        """(c_skip, c_out) of the EDM denoiser."""
        sigma_data = self.config.sigma_data
        return sigma_data**2 / (sigma**2 + sigma_data**2), sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5

    def get_scalings_for_boundary_condition(self, sigma):
        """(c_skip, c_out) that make the consistency function the identity at sigma_min."""
        sigma_min, sigma_data = self.config.sigma_min, self.config.sigma_data
        c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
        c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> CMStochasticIterativeSchedulerOutput | tuple:
        """Denoise to the consistency estimate, then add noise of the next level (none for one step)."""
        sm.reject_integer_timestep(timestep)
        if not self.is_scale_input_called:
            logger.warning("call scale_model_input before step, or the sample is denoised at the wrong scale")
        cfg = self.config
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        c_skip, c_out = self.get_scalings_for_boundary_condition(self.sigmas[i])
        denoised = c_out * model_output + c_skip * sample
        if cfg.clip_denoised:
            denoised = denoised.clamp(-1, 1)
        if len(self.timesteps) > 1:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
        else:
            noise = torch.zeros_like(model_output)
        sigma_hat = self.sigmas[i + 1].clamp(min=cfg.sigma_min, max=cfg.sigma_max)
        prev_sample = denoised + noise * cfg.s_noise * (sigma_hat**2 - cfg.sigma_min**2) ** 0.5
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return CMStochasticIterativeSchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma * noise at the schedule positions of ``timesteps``."""
        return sm.add_noise_sigmas(original_samples, noise, self.sigmas,
                                   self._noise_indices(timesteps, original_samples.device))
