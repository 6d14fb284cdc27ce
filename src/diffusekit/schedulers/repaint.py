"""RePaint (Lugmayr et al., 2022): inpainting with an unconditional DDPM. Each step denoises the
unknown region (DDIM with ``eta``) and re-noises the known one from the original image; the
schedule jumps back up ``jump_length`` steps ``jump_n_sample - 1`` times ("resampling")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import BaseOutput, randn_tensor
from . import schedule_math as sm
from .ddim import ddim_variance
from .scheduling_utils import SchedulerMixin


@dataclass
class RePaintSchedulerOutput(BaseOutput):
    """``prev_sample`` for the next step, and the model's clean estimate ``pred_original_sample``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def resampling_schedule(num_inference_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Step positions descending from n - 1 to 0, going back up ``jump_length`` positions
    ``jump_n_sample - 1`` times at every ``jump_length``-th position."""
    jumps = {j: jump_n_sample - 1 for j in range(0, num_inference_steps - jump_length, jump_length)}
    positions, t = [], num_inference_steps
    while t >= 1:
        t -= 1
        positions.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            positions.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    return positions


class RePaintScheduler(SchedulerMixin):
    """DDIM-style steps on the unknown region, forward-noised original on the known one, and
    ``undo_step`` to re-noise by one jump."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        eta: float = 0.0,
        trained_betas: np.ndarray | None = None,
        clip_sample: bool = True,
    ):
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(self.config)
        self.one = torch.tensor(1.0)
        self.final_alpha_cumprod = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.eta = eta

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """RePaint does not scale its input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10,
                      device=None) -> None:
        """The resampling schedule of ``num_inference_steps`` (at most num_train_timesteps) steps."""
        n = min(self.config.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = n
        positions = np.array(resampling_schedule(n, jump_length, jump_n_sample))
        self.timesteps = torch.from_numpy(positions * (self.config.num_train_timesteps // n)).to(device)

    @property
    def _stride(self) -> int:
        return self.config.num_train_timesteps // self.num_inference_steps

    def _alpha(self, t: int):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _get_variance(self, t: int) -> torch.Tensor:
        return ddim_variance(self._alpha(t), self._alpha(t - self._stride))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, original_image: torch.Tensor,
             mask: torch.Tensor, generator=None, return_dict: bool = True) -> RePaintSchedulerOutput | tuple:
        """One step down: DDIM (noise ``eta``) where ``mask`` is 0, the re-noised original where it is 1."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(timestep)
        alpha_prod_t, alpha_prod_prev = self._alpha(t), self._alpha(t - self._stride)
        x0 = sm.x0_from_alpha(model_output, sample, alpha_prod_t, "epsilon")
        if self.config.clip_sample:
            x0 = torch.clamp(x0, -1, 1)
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        std_dev_t = self.eta * self._get_variance(t) ** 0.5
        unknown = sm.ddim_mean(x0, model_output, alpha_prod_prev, std_dev_t)
        if t > 0 and self.eta > 0:
            unknown = unknown + std_dev_t * noise
        known = alpha_prod_prev**0.5 * original_image + (1 - alpha_prod_prev) ** 0.5 * noise
        prev_sample = mask * known + (1.0 - mask) * unknown
        if not return_dict:
            return prev_sample, x0
        return RePaintSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def undo_step(self, sample: torch.Tensor, timestep, generator=None) -> torch.Tensor:
        """Forward-noise ``sample`` from ``timestep`` by one inference step (T/n training steps)."""
        start = int(timestep)
        for i in range(self._stride):
            beta = self.betas[start + i]
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            sample = (1 - beta) ** 0.5 * sample + beta**0.5 * noise
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        raise NotImplementedError("RePaint does not add noise for training; use DDPMScheduler.add_noise")
