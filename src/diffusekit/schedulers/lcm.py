"""Latent consistency model sampler (Luo et al., 2023): each step jumps to the consistency
function's clean estimate, then re-noises it to the next timestep."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin
from .stepping import StepIndexMixin, like_timestep

logger = logging.getLogger(__name__)


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step, and ``denoised``, the consistency model's clean estimate."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def consistency_scalings(timestep, timestep_scaling: float, sigma_data: float = 0.5):
    """Boundary-condition scalings (c_skip, c_out) of the consistency parameterisation."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class LCMScheduler(StepIndexMixin, SchedulerMixin):
    """Multistep consistency sampling on timesteps drawn from the distillation schedule."""

    _compatibles = ()
    order = 1
    _steps_capped_by_training = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(self.config)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.sigma_data = 0.5
        self._use_schedule(np.arange(num_train_timesteps)[::-1].copy())

    def _use_schedule(self, timesteps: np.ndarray, device=None) -> None:
        self._host_timesteps = [int(t) for t in timesteps]
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.long)
        self._reset_index()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """LCM does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      original_inference_steps: int | None = None, timesteps: list[int] | None = None,
                      strength: float = 1.0):
        """Pick ``num_inference_steps`` evenly from the ``original_inference_steps``-point distillation
        schedule (shortened by ``strength`` for img2img), or use custom ``timesteps``."""
        cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        original_steps = original_inference_steps or cfg.original_inference_steps
        origin = self._origin_timesteps(original_inference_steps, original_steps, strength)
        if timesteps is not None:
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError("timesteps must be in descending order")
            if timesteps[0] >= cfg.num_train_timesteps:
                raise ValueError(f"timesteps must start below num_train_timesteps ({cfg.num_train_timesteps})")
            off_schedule = [t for t in timesteps[1:] if t not in set(origin)]
            if off_schedule:
                logger.warning("timesteps %s are not on the distillation schedule; results may suffer", off_schedule)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            t_start = max(self.num_inference_steps - min(int(self.num_inference_steps * strength),
                                                         self.num_inference_steps), 0)
            schedule = np.array(timesteps, dtype=np.int64)[t_start * self.order:]
        else:
            if len(origin) // num_inference_steps < 1:
                raise ValueError(f"original_inference_steps x strength ({original_steps} x {strength}) is smaller "
                                 f"than num_inference_steps ({num_inference_steps})")
            if num_inference_steps > original_steps:
                raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot exceed original_inference_steps "
                                 f"({original_steps})")
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            origin = origin[::-1].copy()
            picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            schedule = origin[picks]
        self._use_schedule(schedule, device)

    def _origin_timesteps(self, given_steps: int | None, original_steps: int, strength: float) -> np.ndarray:
        """The distillation schedule (ascending) that inference timesteps are picked from: every
        ``num_train_timesteps // original_steps``-th timestep, the first ``strength`` of them."""
        cfg = self.config
        if original_steps > cfg.num_train_timesteps:
            raise ValueError(f"original_inference_steps ({original_steps}) cannot exceed num_train_timesteps "
                             f"({cfg.num_train_timesteps})")
        k = cfg.num_train_timesteps // original_steps
        return np.arange(1, int(original_steps * strength) + 1) * k - 1

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) at ``timestep``."""
        return consistency_scalings(timestep, self.config.timestep_scaling, self.sigma_data)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> LCMSchedulerOutput | tuple:
        """Denoise with the consistency function, then (except at the last step) re-noise to the next timestep."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        t = self._host_timesteps[i]
        prev_t = self._host_timesteps[i + 1] if i + 1 < len(self._host_timesteps) else t
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        # scalings in float32, as the reference computes them from the int64 timestep tensor
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        x0 = sm.x0_from_alpha(model_output, sample, alpha_prod_t, self.config.prediction_type)
        x0 = sm.clip_denoised(x0, self.config)
        denoised = c_out * x0 + c_skip * sample
        if i != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=denoised.dtype)
            prev_sample = alpha_prod_prev.sqrt() * denoised + (1 - alpha_prod_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def previous_timestep(self, timestep) -> int | torch.Tensor:
        """The timestep after ``timestep`` in the schedule (-1 at the end); a tensor for a tensor
        ``timestep``, as the reference. Reads ``timestep`` on the host."""
        index = self.index_for_timestep(timestep)
        return like_timestep(self._host_timesteps[index + 1] if index + 1 < len(self._host_timesteps) else -1,
                             timestep)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.add_noise_alphas(original_samples, noise, timesteps, self.alphas_cumprod)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.velocity_alphas(sample, noise, timesteps, self.alphas_cumprod)
