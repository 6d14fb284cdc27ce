"""The two-step sampler of OpenAI's consistency decoder (DALL-E 3's VAE decoder): a consistency
function on a cosine VP schedule, evaluated at t=1008, re-noised to t=512 and evaluated again.

It is internal to :class:`~diffusekit.models.consistency_decoder_vae.ConsistencyDecoderVAE` (which
builds one with the defaults), so it has no sampler name for ``--scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, Generator, randn_tensor
from . import schedule_math as sm
from .scheduling_utils import SchedulerMixin

#: The decoder was distilled for exactly these two timesteps (of 1024 training steps).
DECODER_TIMESTEPS = (1008, 512)


@dataclass
class ConsistencyDecoderSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample for the next step (the decoded image after the last one)."""

    prev_sample: torch.Tensor


class ConsistencyDecoderScheduler(SchedulerMixin):
    """Consistency sampling for the consistency decoder: ``x0 = c_out * F(c_in * x_t) + c_skip * x_t``.

    Tables over the ``num_train_timesteps`` training steps (cosine betas): ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod`` and the preconditioning ``c_skip``, ``c_out``, ``c_in`` for
    data of standard deviation ``sigma_data``. Only ``num_inference_steps=2`` is supported.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1024, sigma_data: float = 0.5) -> None:
        alphas_cumprod = torch.cumprod(1.0 - sm.betas_for_alpha_bar(num_train_timesteps), dim=0)
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        sigmas = (1.0 / alphas_cumprod - 1).sqrt()
        sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        spread = sigmas**2 + sigma_data**2
        self.c_skip = sqrt_recip_alphas_cumprod * sigma_data**2 / spread
        self.c_out = sigmas * sigma_data / spread**0.5
        self.c_in = sqrt_recip_alphas_cumprod / spread**0.5
        self.timesteps = torch.tensor(DECODER_TIMESTEPS, dtype=torch.long)
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The decoder's two timesteps, with the tables moved to ``device``."""
        if num_inference_steps != len(DECODER_TIMESTEPS):
            raise ValueError(f"num_inference_steps must be {len(DECODER_TIMESTEPS)} for the consistency decoder, "
                             f"got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(DECODER_TIMESTEPS, dtype=torch.long, device=device)
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "c_skip", "c_out", "c_in"):
            setattr(self, name, getattr(self, name).to(device))

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The noise level of the first timestep: ``sqrt(1 - alphas_cumprod[timesteps[0]])``."""
        return self.sqrt_one_minus_alphas_cumprod[self.timesteps[0]]

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """``c_in[timestep] * sample``, the decoder UNet's input scaling."""
        return sample * self.c_in[timestep]

    def _position(self, timestep: int | torch.Tensor) -> int:
        matches = (self.timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's timesteps "
                             f"{self.timesteps.tolist()}")
        return int(matches[0])

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None, return_dict: bool = True) -> ConsistencyDecoderSchedulerOutput | tuple:
        """The consistency estimate of x0; before the last timestep, noised to the next one."""
        x0 = self.c_out[timestep] * model_output + self.c_skip[timestep] * sample
        i = self._position(timestep)
        if i == len(self.timesteps) - 1:
            prev_sample = x0
        else:
            following = self.timesteps[i + 1]
            noise = randn_tensor(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            prev_sample = (self.sqrt_alphas_cumprod[following].to(x0.dtype) * x0
                           + self.sqrt_one_minus_alphas_cumprod[following].to(x0.dtype) * noise)
        if not return_dict:
            return (prev_sample,)
        return ConsistencyDecoderSchedulerOutput(prev_sample=prev_sample)
