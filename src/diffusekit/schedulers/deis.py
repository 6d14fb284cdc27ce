"""DEIS multistep (Zhang & Chen 2022, arXiv:2204.13902): exponential integrator on eps with a
polynomial extrapolation of past eps in log(rho), rho = sigma_t / alpha_t ("logrho" solver)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .multistep_math import (
    NoiseLevel, check_prediction_type, data_to_noise, dpm_solver_update, last_sigma, predict_data, solver_timesteps,
    threshold_data,
)
from .schedule_math import sigma_kind
from .scheduling_utils import SchedulerOutput
from .solver_base import SolverSchedulerBase


def logrho_weights(rho_t, rho_nodes: list) -> list:
    """Integral over rho in [rho_s0, rho_t] of each Lagrange basis polynomial in log(rho) through
    ``rho_nodes`` (closed forms for 2 and 3 nodes)."""
    logs = [torch.log(r) for r in rho_nodes]

    def antiderivative(t, i):
        log_t, others = torch.log(t), logs[i + 1:] + logs[:i]  # the other nodes, cyclically
        if len(others) == 1:
            (c,) = others
            return t * (-c + log_t - 1) / (logs[i] - c)
        c, d = others
        num = t * (c * (d - log_t + 1) - d * log_t + d + log_t**2 - 2 * log_t + 2)
        return num / ((logs[i] - c) * (logs[i] - d))

    rho_s0 = rho_nodes[0]
    return [antiderivative(rho_t, i) - antiderivative(rho_s0, i) for i in range(len(rho_nodes))]


class DEISMultistepScheduler(SolverSchedulerBase):
    """DEIS with the log-rho multistep solver, orders 1-3."""

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if algorithm_type in ("dpmsolver", "dpmsolver++"):
            self.register_to_config(algorithm_type="deis")
        elif algorithm_type != "deis":
            raise ValueError(f"algorithm_type must be 'deis', got {algorithm_type!r}")
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")
        elif solver_type != "logrho":
            raise ValueError(f"solver_type must be 'logrho', got {solver_type!r}")
        check_prediction_type(prediction_type)
        self.flow_shift = flow_shift
        self._init_tables()

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None) -> None:
        """Choose the inference timesteps and sigmas."""
        cfg = self.config
        self._apply_mu(mu)
        timesteps = solver_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                                     steps_offset=cfg.steps_offset)
        kind = sigma_kind(cfg)
        sigmas, timesteps = self._inference_sigmas(kind, timesteps, num_inference_steps, kind == "karras")
        if kind is not None or cfg.use_flow_sigmas:
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        else:
            sigmas = np.concatenate([sigmas, [last_sigma("sigma_min", self.alphas_cumprod)]])
        self._set_schedule(sigmas, timesteps, device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """eps implied by the (thresholded) x_0 prediction."""
        if sample is None:
            raise ValueError("convert_model_output needs sample=")
        sigma, flow = self.sigmas[self._step_index], self._flow
        x0 = threshold_data(predict_data(model_output, sample, sigma, self.config.prediction_type, flow), self.config)
        return data_to_noise(x0, sample, sigma, flow)

    def _update(self, order: int, sample: torch.Tensor) -> torch.Tensor:
        i, flow = self._step_index, self._flow
        target = NoiseLevel(self.sigmas[i + 1], flow)
        s = [NoiseLevel(self.sigmas[i - k], flow) for k in range(order)]
        if order == 1:
            return dpm_solver_update("dpmsolver", sample, s[0], target, target.lam - s[0].lam, [("D0", self.model_outputs[-1])])
        weights = logrho_weights(target.sigma / target.alpha, [p.sigma / p.alpha for p in s])
        drift = sample / s[0].alpha
        for w, m in zip(weights, self.model_outputs[::-1]):
            drift = drift + w * m
        return target.alpha * drift

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Advance ``sample`` one step."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg, i, n = self.config, self._step_index, len(self.timesteps)
        short = cfg.lower_order_final and n < 15
        self._remember(self.convert_model_output(model_output, sample=sample))
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or (i == n - 1 and short):
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or (i == n - 2 and short):
            order = 2
        else:
            order = 3
        prev_sample = self._update(order, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
