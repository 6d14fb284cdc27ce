"""Linear multistep sampler: k-diffusion ``sample_lms`` (Adams-Bashforth in sigma, coefficients by
integrating the Lagrange basis over each step)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import integrate

from ..configuration import register_to_config
from . import schedule_math as sm
from .scheduling_utils import SchedulerOutput
from .sigma_base import SigmaSchedulerBase

LMSDiscreteSchedulerOutput = SchedulerOutput


def linear_multistep_coeff(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i - j
    through the nodes sigma_i, ..., sigma_{i-order+1}."""
    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


class LMSDiscreteScheduler(SigmaSchedulerBase):
    """Linear multistep: combine the last ``order`` derivatives with integrated Lagrange weights."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
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
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose ``num_inference_steps`` steps spaced by ``timestep_spacing`` and the sigma ramp."""
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = self._spaced_schedule(num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self._host_sigmas = [float(s) for s in sigmas]
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.float32)
        self.derivatives: list[torch.Tensor] = []
        self._reset_index()

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """The LMS weight of derivative ``current_order`` steps back, at step ``t``."""
        return linear_multistep_coeff(order, self._host_sigmas, t, current_order)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One linear multistep step of up to ``order`` (fewer at the start)."""
        i = self._start_step(timestep)
        sigma = self.sigmas[i]
        x0 = sm.to_denoised(model_output, sample, sigma, self.config.prediction_type)
        self.derivatives = (self.derivatives + [sm.to_d(sample, x0, sigma)])[-order:]
        order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(order, self._host_sigmas, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
