"""Euler sampler on the EDM formulation (Karras et al., 2022): preconditioned denoiser
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), sigmas from a Karras or exponential ramp."""

from __future__ import annotations

import math

import torch

from ..configuration import register_to_config
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin, SchedulerOutput
from .stepping import StepIndexMixin

EDMEulerSchedulerOutput = SchedulerOutput


class EDMEulerScheduler(StepIndexMixin, SchedulerMixin):
    """Euler steps in sigma for EDM-preconditioned models (``sigma_data`` scaling)."""

    _compatibles = ()
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule must be karras or exponential, got {sigma_schedule!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be zero or sigma_min, got {final_sigmas_type!r}")
        self.num_inference_steps = None
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self._use_sigmas(self._ramp_to_sigmas(ramp))

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _ramp_to_sigmas(self, ramp: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.sigma_schedule == "karras":
            low, high = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
            return (high + ramp * (low - high)) ** cfg.rho
        return torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), len(ramp)).exp().flip(0)

    def _use_sigmas(self, sigmas: torch.Tensor, device=None) -> None:
        sigmas = sigmas.to(dtype=torch.float32)
        self.timesteps = self.precondition_noise(sigmas).to(device)
        last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.cat([sigmas, torch.full((1,), fill_value=last)])
        self._reset_index()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None):
        """Choose the schedule from ``num_inference_steps`` evenly spaced ramp points, or from
        ``sigmas`` given as ramp points in [0, 1]."""
        self.num_inference_steps = num_inference_steps
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or sigmas")
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas).to(torch.float64)
        self._use_sigmas(self._ramp_to_sigmas(ramp), device)

    # -- preconditioning (EDM Table 1) ------------------------------------------------------------

    def _get_conditioning_c_in(self, sigma):
        return 1 / (sigma**2 + self.config.sigma_data**2) ** 0.5

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """c_in * x."""
        return sample * self._get_conditioning_c_in(sigma)

    def precondition_noise(self, sigma) -> torch.Tensor:
        """c_noise = log(sigma) / 4: the model's time input."""
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoised estimate c_skip * x + c_out * F."""
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """c_in-scale the sample for the model."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return self.precondition_inputs(sample, self.sigmas[self._step_index])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, pred_original_sample: torch.Tensor | None = None):
        """One Euler step from sigma_i to sigma_{i+1}, with optional churn (Karras Alg. 2)."""
        sm.reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        sample, sigma_hat = sm.churn(sample, sigma, len(self.sigmas), s_churn, s_tmin, s_tmax, s_noise, generator,
                                     model_output)
        if pred_original_sample is None:
            pred_original_sample = self.precondition_outputs(sample, model_output, sigma_hat)
        prev_sample = sample + sm.to_d(sample, pred_original_sample, sigma_hat) * (self.sigmas[i + 1] - sigma_hat)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma * noise at the schedule positions of ``timesteps``."""
        return sm.add_noise_sigmas(original_samples, noise, self.sigmas,
                                   self._noise_indices(timesteps, original_samples.device))
