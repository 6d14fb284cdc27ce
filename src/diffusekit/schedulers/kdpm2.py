"""DPM-Solver-2 sampler (Karras et al., 2022, Alg. 1 variant): k-diffusion ``sample_dpm_2``. Each
step evaluates the model at sigma_i, then at the geometric midpoint of sigma_i and sigma_{i+1}."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import schedule_math as sm
from .scheduling_utils import SchedulerOutput
from .sigma_base import SigmaSchedulerBase

KDPM2DiscreteSchedulerOutput = SchedulerOutput


def dpm2_schedule(scheduler: SigmaSchedulerBase, n: int, num_train_timesteps: int | None):
    """Spaced sigmas (final 0 appended) and timesteps for the DPM2 samplers; Karras timesteps are rounded."""
    sigmas, timesteps = scheduler._spaced_schedule(n, num_train_timesteps)
    if sm.sigma_kind(scheduler.config) == "karras":
        timesteps = np.round(timesteps)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), torch.from_numpy(np.asarray(timesteps))


def midpoint_timesteps(sigmas_mid: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional training timesteps of the midpoint sigmas."""
    log_sigmas = torch.from_numpy(np.log(sm.train_sigmas(alphas_cumprod)))
    return sm.sigma_to_t(sigmas_mid, log_sigmas)


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[first0, second0, first1, second1, ...]``."""
    return torch.stack((first, second), dim=-1).flatten()


class KDPM2DiscreteScheduler(SigmaSchedulerBase):
    """Second-order DPM2: ``timesteps`` alternates step and midpoint timesteps."""

    order = 2
    prediction_types = ("epsilon", "v_prediction")
    #: The midpoints whose timesteps go between the step timesteps.
    _timed_midpoints = slice(1, -1)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._init_tables()
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None):
        """Choose ``num_inference_steps`` steps spaced by ``timestep_spacing`` and the sigma ramp."""
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = dpm2_schedule(self, num_inference_steps, num_train_timesteps)
        self.log_sigmas = torch.from_numpy(np.log(sm.train_sigmas(self.alphas_cumprod)))
        sigmas_mid = self._set_sigma_tables(sigmas)
        t_mid = midpoint_timesteps(sigmas_mid, self.alphas_cumprod).to(timesteps.dtype)
        self.timesteps = torch.cat([timesteps[:1], interleave(t_mid[self._timed_midpoints], timesteps[1:])]).to(device)
        self.sample = None
        self._reset_index()

    def _set_sigma_tables(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Fill the per-call sigma tables from the step sigmas (final 0 included); returns the midpoint sigmas."""
        sigmas_mid = sm.log_midpoint(sigmas, sigmas.roll(1))
        self.sigmas = sm.repeat_inner(sigmas)
        self.sigmas_interpol = sm.repeat_inner(sigmas_mid)
        return sigmas_mid

    @property
    def state_in_first_order(self) -> bool:
        """True before the step-point call, False before the midpoint call."""
        return self.sample is None

    def _input_sigma(self) -> torch.Tensor:
        i = self._step_index
        return self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """The step-point (first call) or midpoint (second call) half of a DPM2 step."""
        i = self._start_step(timestep)
        ptype = self.config.prediction_type
        if self.state_in_first_order:
            sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i + 1]
            x0 = sm.to_denoised(model_output, sample, sigma, ptype)
            prev_sample = sample + sm.to_d(sample, x0, sigma) * (sigma_mid - sigma)
            self.sample = sample
        else:
            sigma, sigma_mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
            x0 = sm.to_denoised(model_output, sample, sigma_mid, ptype)
            prev_sample = self.sample + sm.to_d(sample, x0, sigma_mid) * (sigma_next - sigma)
            self.sample = None
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
