"""DDIM (Song et al., 2020): the implicit, optionally stochastic (eta) sampler."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from . import schedule_math as sm
from .names import KARRAS_DIFFUSION_SCHEDULERS
from .scheduling_utils import SchedulerMixin, SchedulerOutput
from .stepping import StepIndexMixin, StepPlan, unscaled_input

DDIMSchedulerOutput = SchedulerOutput


def ddim_variance(alpha_prod_t, alpha_prod_prev):
    """sigma_t^2 / eta^2 of DDIM eq. (16): (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)."""
    return (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)


def ddim_update(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t, alpha_prod_prev, constants: tuple,
                eta: float = 0.0, use_clipped_model_output: bool = False):
    """DDIM eq. (12) without its noise: ``(prev_sample mean, x0, std_dev_t)``; ``constants`` =
    ``(prediction_type, clip settings)`` (:meth:`DDIMScheduler.step_constants`)."""
    prediction_type, clip = constants
    x0 = sm.clip_x0(sm.x0_from_alpha(model_output, sample, alpha_prod_t, prediction_type), clip)
    eps = sm.eps_from_alpha(model_output, sample, alpha_prod_t, prediction_type)
    std_dev_t = eta * ddim_variance(alpha_prod_t, alpha_prod_prev) ** 0.5
    if use_clipped_model_output:
        eps = (sample - alpha_prod_t**0.5 * x0) / (1 - alpha_prod_t) ** 0.5
    return sm.ddim_mean(x0, eps, alpha_prod_prev, std_dev_t), x0, std_dev_t


def ddim_plan_update(model_output: torch.Tensor, sample: torch.Tensor, row: torch.Tensor,
                     constants: tuple) -> torch.Tensor:
    """:class:`StepPlan` update: ``row`` = (alpha_prod_t, alpha_prod_prev), no noise (eta 0)."""
    return ddim_update(model_output, sample, row[0], row[1], constants)[0]


class DDIMScheduler(StepIndexMixin, SchedulerMixin):
    """Denoising diffusion implicit models: deterministic for ``eta=0``, DDPM-like for ``eta=1``."""

    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
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
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(self.config)
        # alpha_bar "before" t=0: 1 (a clean final step) or alphas_cumprod[0]
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._use_schedule(np.arange(num_train_timesteps)[::-1].copy())

    def _use_schedule(self, timesteps: np.ndarray, device=None) -> None:
        self._host_timesteps = [int(t) for t in timesteps]
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        self._reset_index()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDIM does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose ``num_inference_steps`` timesteps spaced by the config's ``timestep_spacing``."""
        self.num_inference_steps = num_inference_steps
        self._use_schedule(sm.spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                               self.config.num_train_timesteps, self.config.steps_offset), device)

    def _alpha(self, t: int):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        return ddim_variance(self._alpha(timestep), self._alpha(prev_timestep))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t - T/n} (eq. 12 of the paper), with noise of scale ``eta``."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._find_index(timestep)
        # a timestep outside the schedule is stepped from as given, as the reference does (custom loops)
        t = int(timestep) if self._step_index is None else self._host_timesteps[self._step_index]
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t, alpha_prod_prev = self._alpha(t), self._alpha(prev_t)
        prev_sample, x0, std_dev_t = ddim_update(model_output, sample, alpha_prod_t, alpha_prod_prev,
                                                 self.step_constants(), eta, use_clipped_model_output)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass only one of generator or variance_noise")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if self._step_index is not None:
            self._step_index = self._step_index + 1 if self._step_index + 1 < len(self._host_timesteps) else None
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def step_constants(self) -> tuple:
        return self.config.prediction_type, sm.clip_settings(self.config)

    def step_plan(self, device=None, eta: float = 0.0, **unused) -> StepPlan | None:
        """The step as a :class:`StepPlan` (rows: alpha_prod at t and at the previous timestep); None
        with ``eta`` > 0 (noise drawn from a generator) and for subclasses that step otherwise."""
        if type(self).step is not DDIMScheduler.step or eta > 0 or self.num_inference_steps is None:
            return None
        stride = self.config.num_train_timesteps // self.num_inference_steps
        rows = torch.stack([torch.stack([self._alpha(t), self._alpha(t - stride)]) for t in self._host_timesteps])
        return StepPlan(rows.to(device), unscaled_input, ddim_plan_update, self.step_constants())

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.add_noise_alphas(original_samples, noise, timesteps, self.alphas_cumprod)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.velocity_alphas(sample, noise, timesteps, self.alphas_cumprod)
