"""Multistep DPM-Solver++ (ODE or SDE) on the EDM formulation (Karras et al., 2022): EDMEuler's
preconditioning and sigma ramps, DPM-Solver's update with alpha_t = 1 (the inputs are pre-scaled)."""

from __future__ import annotations

import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from .dpmsolver_multistep import normalize_solver_config
from .edm_euler import EDMEulerScheduler
from .multistep_math import NoiseLevel, last_sigma, multistep_dpm_update, multistep_order, threshold_data
from .scheduling_utils import SchedulerOutput
from .solver_base import check_solver_order

EDM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class EDMDPMSolverMultistepScheduler(EDMEulerScheduler):
    """DPM-Solver++ multistep for EDM-preconditioned models: reuses the last 1-2 denoised estimates."""

    _missing_timestep_is_last = True

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ):
        if algorithm_type not in EDM_ALGORITHMS and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' needs algorithm_type dpmsolver++ or sde-dpmsolver++; use "
                             f"'sigma_min' with {algorithm_type!r}")
        normalize_solver_config(self, EDM_ALGORITHMS)
        check_solver_order(solver_order)
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule must be karras or exponential, got {sigma_schedule!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        if self.config.algorithm_type == "sde-dpmsolver++" and solver_order == 3:
            raise ValueError("solver_order=3 is not available for algorithm_type='sde-dpmsolver++'")
        last_sigma(final_sigmas_type, None, sigma_min)  # rejects an unknown final_sigmas_type
        self.num_inference_steps = None
        sigmas = self._ramp_to_sigmas(torch.linspace(0, 1, num_train_timesteps))
        self.timesteps = self.precondition_noise(sigmas)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._reset_index()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """``num_inference_steps`` sigmas on the config's ramp, then the final sigma (0 or sigma_min)."""
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required")
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        sigmas = self._ramp_to_sigmas(torch.linspace(0, 1, num_inference_steps)).to(torch.float32)
        self.timesteps = self.precondition_noise(sigmas).to(device)
        final = torch.tensor([last_sigma(cfg.final_sigmas_type, None, cfg.sigma_min)], dtype=torch.float32)
        self.sigmas = torch.cat([sigmas, final])
        self._reset_history()

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The preconditioned denoised estimate x_0, thresholded when the config asks."""
        return threshold_data(self.precondition_outputs(sample, model_output, self.sigmas[self._step_index]),
                              self.config)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """Advance ``sample`` one step; the SDE variant draws its noise from ``generator``."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i, cfg = self._step_index, self.config
        order = multistep_order(cfg, i, len(self.timesteps), self.lower_order_nums)
        converted = self.convert_model_output(model_output, sample)
        self.model_outputs = [*self.model_outputs[1:], converted]
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(converted.shape, generator=generator, device=converted.device, dtype=converted.dtype)
        levels = [NoiseLevel.preconditioned(self.sigmas[i + 1]),
                  *(NoiseLevel.preconditioned(self.sigmas[i - k]) for k in range(order))]
        prev_sample = multistep_dpm_update(cfg, sample, levels, self.model_outputs, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
