"""DPM-Solver(++) multistep run from clean to noisy (inversion), as for DiffEdit: the timesteps and
sigmas ascend, the update is DPMSolverMultistepScheduler's."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .dpmsolver_multistep import DPMSolverMultistepScheduler, normalize_solver_config
from .multistep_math import flow_sigmas, inverse_solver_timesteps
from .schedule_math import sigma_kind, sigma_ramp, sigma_to_t, train_sigmas


class DPMSolverMultistepInverseScheduler(DPMSolverMultistepScheduler):
    """The inverse multistep DPM-Solver: noises a sample along the solver's ODE (or SDE)."""

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
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        normalize_solver_config(self)
        if self.config.algorithm_type.startswith("sde") and solver_order == 3:
            raise ValueError(f"solver_order=3 is not available for algorithm_type={self.config.algorithm_type!r} "
                             "in the inverse solver")
        self.flow_shift = flow_shift
        self._init_tables()
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """Ascending timesteps up to the noisiest one above ``lambda_min_clipped``, with their sigmas
        (repeated timesteps of a sigma ramp dropped)."""
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required")
        cfg = self.config
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped))
        self.noisiest_timestep = cfg.num_train_timesteps - 1 - clipped
        timesteps = inverse_solver_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                                             self.noisiest_timestep, cfg.steps_offset)
        sigmas = train_sigmas(self.alphas_cumprod)
        kind = sigma_kind(cfg)
        if kind is not None:
            ramp = sigma_ramp(kind, sigmas, num_inference_steps)  # ascending, as the training sigmas
            timesteps = sigma_to_t(ramp, np.log(sigmas))
            timesteps = timesteps.round().astype(np.int64) if kind == "karras" else timesteps
            sigmas = np.concatenate([ramp, ramp[-1:]])
        elif cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_inference_steps, cfg.num_train_timesteps, self.flow_shift)
            timesteps = sigmas * cfg.num_train_timesteps
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        else:
            noisiest_sigma = sigmas[self.noisiest_timestep]
            sigmas = np.concatenate([np.interp(timesteps, np.arange(len(sigmas)), sigmas), [noisiest_sigma]])
        _, first = np.unique(timesteps, return_index=True)
        self._set_schedule(sigmas, timesteps[np.sort(first)], device)
