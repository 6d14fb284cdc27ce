"""Latent consistency sampling for flow-matching models: each step jumps to the clean estimate
x0 = x - sigma v and re-noises it to the next sigma; optionally upscaling x0 between steps
(``scale_factors``), as multi-resolution consistency models sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .flow_match_euler import FlowMatchEulerDiscreteScheduler

UPSCALE_MODES = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact")


@dataclass
class FlowMatchLCMSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step."""

    prev_sample: torch.Tensor


class FlowMatchLCMScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler's schedule with consistency steps (x0, then fresh noise at the next sigma)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        scale_factors: list[float] | None = None,
        upscale_mode: str = "bicubic",
    ):
        self._init_schedule()
        self._init_size = None
        self.set_scale_factors(scale_factors, upscale_mode)

    def set_scale_factors(self, scale_factors: list[float] | None, upscale_mode: str) -> None:
        """Upscale x0 by ``scale_factors[i]`` (of the first step's size) after step i, with ``upscale_mode``."""
        if upscale_mode not in UPSCALE_MODES:
            raise ValueError(f"upscale_mode must be one of {', '.join(UPSCALE_MODES)}, got {upscale_mode!r}")
        self._scale_factors = scale_factors
        self._upscale_mode = upscale_mode

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> FlowMatchLCMSchedulerOutput | tuple:
        """Jump to the clean estimate (upscaled when asked), then re-noise it to the next sigma."""
        sm.reject_integer_timestep(timestep)
        scaling = bool(self._scale_factors) and bool(self._upscale_mode)
        if scaling and len(self.timesteps) != len(self._scale_factors) + 1:
            raise ValueError(f"scale_factors needs len(timesteps) - 1 = {len(self.timesteps) - 1} entries, "
                             f"got {len(self._scale_factors)}")
        if self._init_size is None or self._step_index is None:
            self._init_size = model_output.shape[2:]
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sample = sample.to(torch.float32)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = sample - sigma * model_output
        if scaling and i < len(self._scale_factors):
            size = [round(self._scale_factors[i] * side) for side in self._init_size]
            x0 = torch.nn.functional.interpolate(x0, size=size, mode=self._upscale_mode)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        prev_sample = ((1 - sigma_next) * x0 + sigma_next * noise).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchLCMSchedulerOutput(prev_sample=prev_sample)
