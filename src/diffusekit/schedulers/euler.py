"""Euler sampler (Karras et al., 2022, Alg. 2, with optional churn): k-diffusion ``sample_euler``."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import schedule_math as sm
from .scheduling_utils import SchedulerOutput
from .sigma_base import SigmaSchedulerBase, unit_variance_input
from .stepping import StepPlan

EulerDiscreteSchedulerOutput = SchedulerOutput


def euler_update(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_hat, sigma_next,
                 prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prev_sample, x0)`` of an Euler step from ``sigma_hat`` (``sigma`` raised by churn) to
    ``sigma_next``; ``sample`` in float32, ``prev_sample`` in the model output's dtype."""
    x0 = sm.to_denoised(model_output, sample, sigma if prediction_type == "v_prediction" else sigma_hat,
                        prediction_type)
    prev_sample = sample + sm.to_d(sample, x0, sigma_hat) * (sigma_next - sigma_hat)
    return prev_sample.to(model_output.dtype), x0


def euler_plan_scale(sample: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """:class:`StepPlan` input scaling: ``row`` = (sigma, sigma_next)."""
    return unit_variance_input(sample, row[0])


def euler_plan_update(model_output: torch.Tensor, sample: torch.Tensor, row: torch.Tensor,
                      constants: tuple) -> torch.Tensor:
    """:class:`StepPlan` update without churn; ``constants`` = (prediction_type,)."""
    return euler_update(model_output, sample.to(torch.float32), row[0], row[0], row[1], constants[0])[0]


class EulerDiscreteScheduler(SigmaSchedulerBase):
    """First-order Euler steps on the probability-flow ODE in sigma."""

    order = 1
    prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")
    rejects_integer_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        if interpolation_type not in ("linear", "log_linear"):
            raise ValueError(f"interpolation_type must be linear or log_linear, got {interpolation_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be zero or sigma_min, got {final_sigmas_type!r}")
        self._init_tables()
        sigmas = sm.sigmas_from_alphas_cumprod(self.alphas_cumprod).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        if self._continuous_timesteps:
            self.timesteps = 0.25 * sigmas.log()
        else:
            self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1]
                                              .astype(np.float32))
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    @property
    def _continuous_timesteps(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[float] | None = None,
                      sigmas: list[float] | None = None):
        """Choose the schedule: ``num_inference_steps`` spaced steps, or custom ``timesteps``, or custom
        ``sigmas`` (ending with the final sigma)."""
        cfg = self.config
        given = [v is not None for v in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and (sm.sigma_kind(cfg) or self._continuous_timesteps):
            raise ValueError("custom timesteps cannot be combined with a sigma ramp or continuous v-prediction timesteps")
        n = num_inference_steps or (len(timesteps) if timesteps is not None else len(sigmas) - 1)
        self.num_inference_steps = n
        log_sigmas = np.log(sm.train_sigmas(self.alphas_cumprod))
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sm.sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = self._spaced_timesteps(n)
            if cfg.interpolation_type == "log_linear":
                train = sm.train_sigmas(self.alphas_cumprod)
                schedule = torch.linspace(np.log(train[-1]), np.log(train[0]), n + 1).exp().numpy()
            else:
                schedule = sm.sigmas_for_timesteps(timesteps, self.alphas_cumprod)
            schedule, timesteps = self._ramp(schedule, timesteps, n, cfg.sigma_min, cfg.sigma_max)
            last = float(sm.sigmas_from_alphas_cumprod(self.alphas_cumprod[0])) \
                if cfg.final_sigmas_type == "sigma_min" else 0.0
            sigmas = np.concatenate([schedule, [last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
        if self._continuous_timesteps:
            self.timesteps = (0.25 * sigmas[:-1].log()).to(device)
        else:
            self.timesteps = torch.from_numpy(np.asarray(timesteps).astype(np.float32)).to(device)
        self.sigmas = sigmas
        self._reset_index()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One Euler step from sigma_i to sigma_{i+1}; ``s_churn`` > 0 first adds noise (Karras Alg. 2)."""
        i = self._start_step(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        sample, sigma_hat = sm.churn(sample, sigma, len(self.sigmas), s_churn, s_tmin, s_tmax, s_noise, generator,
                                     model_output)
        prev_sample, x0 = euler_update(model_output, sample, sigma, sigma_hat, self.sigmas[i + 1],
                                       self.config.prediction_type)
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def step_plan(self, device=None, **unused) -> StepPlan | None:
        """The step without churn as a :class:`StepPlan` (rows: sigma, next sigma); None for subclasses
        that step otherwise."""
        if type(self).step is not EulerDiscreteScheduler.step or self.num_inference_steps is None:
            return None
        rows = torch.stack([self.sigmas[:-1], self.sigmas[1:]], dim=1)
        return StepPlan(rows.to(device), euler_plan_scale, euler_plan_update, (self.config.prediction_type,))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v target at ``timesteps``; like the reference, alphas are read at the timesteps' schedule positions."""
        if isinstance(timesteps, int) or (isinstance(timesteps, torch.Tensor) and not timesteps.is_floating_point()):
            raise ValueError("pass timesteps from scheduler.timesteps, not integer indices")
        schedule = self.timesteps.to(sample.device)
        indices = [self.index_for_timestep(t, schedule) for t in timesteps.to(sample.device)]
        return sm.velocity_alphas(sample, noise, torch.tensor(indices), self.alphas_cumprod)
