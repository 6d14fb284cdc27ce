"""The stateful shell shared by the multistep ODE/SDE solvers (DPM-Solver, DEIS, UniPC): training
schedule tables, step index, history of converted model outputs, ``add_noise``."""

from __future__ import annotations

import numpy as np
import torch

from .multistep_math import flow_sigmas, half_log_snr, ramp_schedule, solver_timesteps
from .schedule_math import alpha_sigma, broadcast_to, sigma_kind, train_sigmas, training_tables
from .names import KARRAS_DIFFUSION_SCHEDULERS
from .scheduling_utils import SchedulerMixin
from .stepping import StepIndexMixin


class SolverSchedulerBase(StepIndexMixin, SchedulerMixin):
    """Training tables (alphas_cumprod, alpha_t, sigma_t, lambda_t, sigmas) and the bookkeeping every
    multistep solver needs. Subclasses fill ``self.sigmas`` / ``self.timesteps`` in ``set_timesteps``."""

    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
    init_noise_sigma = 1.0
    _missing_timestep_is_last = True

    def _init_tables(self) -> None:
        cfg = self.config
        sigma_kind(cfg)  # rejects more than one of use_{karras,exponential,beta}_sigmas
        self._check_orders()
        self.betas, self.alphas, self.alphas_cumprod = training_tables(cfg, finite_last_sigma=True)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = half_log_snr(self.alpha_t, self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.num_inference_steps = None
        self._reset_history()

    def _check_orders(self) -> None:
        check_solver_order(self.config.solver_order)

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._reset_index()

    def _apply_mu(self, mu: float | None) -> None:
        """Dynamic shifting: a given ``mu`` sets the flow shift to e^mu."""
        if mu is None:
            return
        cfg = self.config
        if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
            raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential'")
        self.flow_shift = float(np.exp(mu))

    def _given_or_spaced_timesteps(self, num_inference_steps: int | None, timesteps, kind: str | None,
                                   spacing: str, steps_offset: int = 0) -> np.ndarray:
        """The caller's integer ``timesteps``, or ``num_inference_steps`` spaced ones above ``lambda_min_clipped``."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and kind is not None:
            raise ValueError(f"timesteps cannot be passed with use_{kind}_{'lambdas' if kind == 'lu' else 'sigmas'}=True")
        if timesteps is not None:
            return np.array(timesteps).astype(np.int64)
        cfg = self.config
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped))
        return solver_timesteps(spacing, num_inference_steps, cfg.num_train_timesteps,
                                cfg.num_train_timesteps - clipped, steps_offset)

    def _inference_sigmas(self, kind: str | None, timesteps: np.ndarray, num_inference_steps: int,
                          round_timesteps: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(sigmas, timesteps)`` without the final sigma: the ``kind`` ramp (timesteps rounded when
        asked), flow-matching sigmas, or the training sigmas at ``timesteps``."""
        cfg = self.config
        sigmas = train_sigmas(self.alphas_cumprod)
        if kind is not None:
            sigmas, timesteps = ramp_schedule(kind, sigmas, num_inference_steps, cfg)
            if round_timesteps:
                timesteps = timesteps.round()
        elif cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_inference_steps, cfg.num_train_timesteps, self.flow_shift)
            timesteps = sigmas * cfg.num_train_timesteps
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        return sigmas, timesteps

    def _set_schedule(self, sigmas: np.ndarray, timesteps: np.ndarray, device) -> None:
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set; call set_timesteps before step")

    @property
    def _flow(self) -> bool:
        return bool(self.config.get("use_flow_sigmas", False))

    def _remember(self, converted: torch.Tensor) -> None:
        """Push a converted model output onto the fixed-length history."""
        self.model_outputs = [*self.model_outputs[1:], converted]

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """These solvers take the sample unscaled."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t noise at the inference sigmas of ``timesteps``."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = broadcast_to(sigmas[self._noise_indices(timesteps, original_samples.device)], original_samples)
        alpha_t, sigma_t = alpha_sigma(sigma, self._flow)
        return alpha_t * original_samples + sigma_t * noise


def check_solver_order(order) -> None:
    if not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"solver_order must be 1, 2 or 3, got {order!r}")
