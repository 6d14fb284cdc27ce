"""Euler sampler for flow-matching models (SD3, Flux): x_sigma = (1 - sigma) x0 + sigma noise, the
model predicts the velocity noise - x0, and a step is x + (sigma_next - sigma) v."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin
from .stepping import StepIndexMixin, StepPlan, unscaled_input


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step."""

    prev_sample: torch.Tensor


def flow_euler_update(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) v, for a float32 ``sample``."""
    return sample + (sigma_next - sigma) * model_output


def flow_plan_update(model_output: torch.Tensor, sample: torch.Tensor, row: torch.Tensor,
                     constants: tuple) -> torch.Tensor:
    """:class:`StepPlan` update (deterministic sampling): ``row`` = (sigma, sigma_next)."""
    return flow_euler_update(model_output, sample.to(torch.float32), row[0], row[1]).to(model_output.dtype)


class FlowMatchEulerDiscreteScheduler(StepIndexMixin, SchedulerMixin):
    """Euler steps along a (shifted) rectified-flow schedule."""

    _compatibles = ()
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        self._init_schedule()

    def _init_schedule(self) -> None:
        """The training schedule (every timestep), shifted unless the shift is dynamic."""
        cfg = self.config
        sm.sigma_kind(cfg)  # rejects more than one sigma ramp
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be exponential or linear, got {cfg.time_shift_type!r}")
        n = cfg.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        sigmas = timesteps / n
        if not cfg.use_dynamic_shifting:
            sigmas = sm.shift_sigmas(sigmas, cfg.shift)
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self._shift = cfg.shift
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.num_inference_steps = None
        self._reset_index()

    @property
    def shift(self) -> float:
        """The static resolution shift (changeable with ``set_shift``)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def time_shift(self, mu: float, sigma: float, t):
        """The config's dynamic time shift with parameter ``mu``."""
        return sm.time_shift(self.config.time_shift_type, mu, sigma, t)

    def stretch_shift_to_terminal(self, t):
        """Stretch the schedule so it ends at ``shift_terminal``."""
        return sm.stretch_to_terminal(t, self.config.shift_terminal)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Flow matching does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas: list[float] | None = None,
                      mu: float | None = None, timesteps: list[float] | None = None):
        """Build the schedule from ``num_inference_steps`` (or custom ``sigmas`` / ``timesteps``), shifted
        statically or, with ``use_dynamic_shifting``, by ``mu``."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas and timesteps must have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or \
                    (timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("sigmas and timesteps must have num_inference_steps entries")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps
        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                n_train = cfg.num_train_timesteps
                timesteps = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
            sigmas = timesteps / cfg.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)
        sigmas = self.time_shift(mu, 1.0, sigmas) if cfg.use_dynamic_shifting else sm.shift_sigmas(sigmas, self.shift)
        if cfg.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        kind = sm.sigma_kind(cfg)
        if kind is not None:
            sigmas = sm.sigma_ramp(kind, sigmas, num_inference_steps)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device) if given_timesteps \
            else sigmas * cfg.num_train_timesteps
        if cfg.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * cfg.num_train_timesteps
        end = torch.ones(1, device=sigmas.device) if cfg.invert_sigmas else torch.zeros(1, device=sigmas.device)
        self.timesteps = timesteps
        self.sigmas = torch.cat([sigmas, end])
        self._reset_index()

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process for img2img: (1 - sigma) x0 + sigma noise at ``timestep``."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        sigma = sm.broadcast_to(sigmas[self._noise_indices(timestep, sample.device)], sample)
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: torch.Tensor | None = None, return_dict: bool = True):
        """One Euler step along the predicted velocity (or, with ``stochastic_sampling``, a jump to the
        clean estimate re-noised to the next sigma). ``s_*`` are accepted for API compatibility."""
        sm.reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sample = sample.to(torch.float32)
        if per_token_timesteps is not None:
            token_sigmas = per_token_timesteps / self.config.num_train_timesteps
            schedule = self.sigmas[:, None, None].to(token_sigmas.device)
            lower = ((schedule < token_sigmas[None] - 1e-6) * schedule).max(dim=0).values
            sigma, sigma_next = token_sigmas[..., None], lower[..., None]
        else:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.config.stochastic_sampling:
            x0 = sample - sigma * model_output
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1.0 - sigma_next) * x0 + sigma_next * noise
        elif per_token_timesteps is not None:  # the reference's sign for per-token steps
            prev_sample = flow_euler_update(model_output, sample, sigma_next, sigma)
        else:
            prev_sample = flow_euler_update(model_output, sample, sigma, sigma_next)
        self._step_index = i + 1
        if per_token_timesteps is None:
            prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def step_plan(self, device=None, **unused) -> StepPlan | None:
        """The deterministic step as a :class:`StepPlan` (rows: sigma, next sigma); None with
        ``stochastic_sampling`` and for subclasses that step otherwise."""
        if type(self).step is not FlowMatchEulerDiscreteScheduler.step or self.config.stochastic_sampling \
                or self.num_inference_steps is None:
            return None
        rows = torch.stack([self.sigmas[:-1], self.sigmas[1:]], dim=1)
        return StepPlan(rows.to(device), unscaled_input, flow_plan_update)
