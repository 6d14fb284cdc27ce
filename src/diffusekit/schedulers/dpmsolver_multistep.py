"""DPM-Solver and DPM-Solver++ multistep (Lu et al. 2022, arXiv:2206.00927 / 2211.01095), ODE and SDE."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from .multistep_math import (
    PREDICTION_TYPES, NoiseLevel, check_prediction_type, data_to_noise, last_sigma, multistep_dpm_update,
    multistep_order, noise_to_data, predict_data, predict_noise, threshold_data,
)
from .schedule_math import sigma_kind
from .scheduling_utils import SchedulerOutput
from .solver_base import SolverSchedulerBase

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


def normalize_solver_config(scheduler, algorithms=ALGORITHMS) -> None:
    """Map another solver family's algorithm/solver names onto DPM-Solver's (as from_config does)."""
    cfg = scheduler.config
    if cfg.algorithm_type == "deis":
        scheduler.register_to_config(algorithm_type="dpmsolver++")
    elif cfg.algorithm_type not in algorithms:
        raise ValueError(f"algorithm_type must be one of {', '.join(algorithms)}; got {cfg.algorithm_type!r}")
    if cfg.solver_type in ("logrho", "bh1", "bh2"):
        scheduler.register_to_config(solver_type="midpoint")
    elif cfg.solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be midpoint or heun; got {cfg.solver_type!r}")
    cfg = scheduler.config
    allowed = PREDICTION_TYPES if cfg.algorithm_type.endswith("++") else PREDICTION_TYPES[:3]  # no flow for eps solvers
    check_prediction_type(cfg.prediction_type, allowed)


def convert_dpm_output(scheduler, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_0 prediction (dpmsolver++ variants) or eps prediction (dpmsolver variants), thresholded if asked."""
    cfg, flow = scheduler.config, scheduler._flow
    if cfg.prediction_type == "epsilon" and cfg.get("variance_type") in ("learned", "learned_range"):
        model_output = model_output[:, : sample.shape[1]]  # drop the predicted variance channels
    if cfg.algorithm_type.endswith("++"):
        return threshold_data(predict_data(model_output, sample, sigma, cfg.prediction_type, flow), cfg)
    eps = predict_noise(model_output, sample, sigma, cfg.prediction_type, flow)
    if cfg.thresholding:
        x0 = threshold_data(noise_to_data(eps, sample, sigma, flow), cfg)
        eps = data_to_noise(x0, sample, sigma, flow)
    return eps


class DPMSolverMultistepScheduler(SolverSchedulerBase):
    """Multistep DPM-Solver(++): reuses the last 1-2 model outputs for order 2-3 updates."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        normalize_solver_config(self)
        if self.config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' needs a dpmsolver++ algorithm_type; use 'sigma_min' with {algorithm_type}")
        if self.config.algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError("solver_order=3 is not available for algorithm_type='sde-dpmsolver'")
        self.flow_shift = flow_shift
        self._init_tables()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the inference timesteps and sigmas (or pass explicit integer ``timesteps``)."""
        cfg = self.config
        self._apply_mu(mu)
        kind = "lu" if cfg.use_lu_lambdas else sigma_kind(cfg)
        timesteps = self._given_or_spaced_timesteps(num_inference_steps, timesteps, kind, cfg.timestep_spacing,
                                                    cfg.steps_offset)
        round_timesteps = kind in ("karras", "lu") and cfg.beta_schedule != "squaredcos_cap_v2"
        sigmas, timesteps = self._inference_sigmas(kind, timesteps, num_inference_steps, round_timesteps)
        sigmas = np.concatenate([sigmas, [last_sigma(cfg.final_sigmas_type, self.alphas_cumprod)]])
        self._set_schedule(sigmas, timesteps, device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The model output as the solver's working prediction (x_0 for ++, eps otherwise)."""
        if sample is None:
            raise ValueError("convert_model_output needs sample=")
        return convert_dpm_output(self, model_output, sample, self.sigmas[self._step_index])

    def _update(self, order: int, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        i, flow = self._step_index, self._flow
        levels = [NoiseLevel(self.sigmas[i + 1], flow), *(NoiseLevel(self.sigmas[i - k], flow) for k in range(order))]
        return multistep_dpm_update(self.config, sample, levels, self.model_outputs, noise)

    def _order(self) -> int:
        return multistep_order(self.config, self._step_index, len(self.timesteps), self.lower_order_nums)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """Advance ``sample`` one step; SDE variants draw noise from ``generator`` (or use ``variance_noise``)."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        order = self._order()
        converted = self.convert_model_output(model_output, sample=sample)
        self._remember(converted)
        sample = sample.to(torch.float32)
        noise = None
        if self.config.algorithm_type.startswith("sde"):
            if variance_noise is None:
                noise = randn_tensor(converted.shape, generator=generator, device=converted.device, dtype=torch.float32)
            else:
                noise = variance_noise.to(device=converted.device, dtype=torch.float32)
        prev_sample = self._update(order, sample, noise).to(converted.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
