"""PNDM (Liu et al., 2022): pseudo Runge-Kutta warm-up, then pseudo linear multistep (PLMS)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import schedule_math as sm
from .names import KARRAS_DIFFUSION_SCHEDULERS
from .scheduling_utils import SchedulerMixin, SchedulerOutput
from .stepping import StepIndexMixin

def transfer(sample, model_output, alpha_prod_t, alpha_prod_prev):
    """The pseudo-numerical transfer phi(x_t, eps, t -> t_prev) of PNDM eq. (9)."""
    sample_coeff = (alpha_prod_prev / alpha_prod_t) ** 0.5
    denom = alpha_prod_t * (1 - alpha_prod_prev) ** 0.5 + (alpha_prod_t * (1 - alpha_prod_t) * alpha_prod_prev) ** 0.5
    return sample_coeff * sample - (alpha_prod_prev - alpha_prod_t) * model_output / denom


class PNDMScheduler(StepIndexMixin, SchedulerMixin):
    """Pseudo numerical methods for diffusion models; ``skip_prk_steps=True`` gives plain PLMS."""

    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction for PNDM, got {prediction_type!r}")
        self.betas, self.alphas, self.alphas_cumprod = sm.training_tables(self.config)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self.num_inference_steps = None
        self.prk_timesteps = self.plms_timesteps = self.timesteps = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.ets: list[torch.Tensor] = []
        self.counter = 0
        self.cur_model_output = 0
        self.cur_sample = None
        self._reset_index()

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Build the PRK warm-up timesteps (unless ``skip_prk_steps``) followed by the PLMS ones."""
        self.num_inference_steps = num_inference_steps
        n_train = self.config.num_train_timesteps
        base = sm.spaced_timesteps(self.config.timestep_spacing, num_inference_steps, n_train,
                                   self.config.steps_offset)[::-1]  # ascending
        if self.config.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            half = n_train // num_inference_steps // 2
            prk = base[-self.pndm_order:].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._host_timesteps = [int(t) for t in timesteps]
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset_state()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PNDM does not scale its input."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A PRK sub-step during warm-up, else a PLMS step."""
        self._check_timesteps_set()
        if self._step_index is None:  # the one host read: where this loop starts
            self._step_index = self._begin_index if self._begin_index is not None else \
                self._host_timesteps.index(int(timestep))
        t = self._host_timesteps[self._step_index]
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._step_prk(model_output, t, sample)
        else:
            prev_sample = self._step_plms(model_output, t, sample)
        self._step_index += 1
        return self._output(prev_sample, return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One pseudo Runge-Kutta warm-up sub-step at ``timestep`` (``step`` takes these first)."""
        self._check_timesteps_set()
        return self._output(self._step_prk(model_output, int(timestep), sample), return_dict)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One pseudo linear multistep at ``timestep`` (after the 12 warm-up sub-steps unless ``skip_prk_steps``)."""
        self._check_timesteps_set()
        return self._output(self._step_plms(model_output, int(timestep), sample), return_dict)

    def _check_timesteps_set(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")

    def _output(self, prev_sample: torch.Tensor, return_dict: bool):
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _step_prk(self, model_output, t: int, sample):
        phase = self.counter % 4
        prev_t = t - (0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(cur_sample, t, prev_t, model_output)

    def _step_plms(self, model_output, t: int, sample):
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PLMS steps need at least 12 PRK warm-up steps first; call set_timesteps and step through")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:  # second call of the first step: re-evaluate at the start point
            prev_t, t = t, t + ratio
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            model_output = sm.adams_bashforth(self.ets)
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(self, sample, t: int, prev_t: int, model_output):
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":
            model_output = alpha_prod_t**0.5 * model_output + (1 - alpha_prod_t) ** 0.5 * sample
        return transfer(sample, model_output, alpha_prod_t, alpha_prod_prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sm.add_noise_alphas(original_samples, noise, timesteps, self.alphas_cumprod)
