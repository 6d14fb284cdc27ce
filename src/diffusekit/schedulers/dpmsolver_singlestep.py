"""Singlestep DPM-Solver(++) (Lu et al. 2022): order-k updates built from k model calls within one
macro step, all taken from the sample at the start of that macro step."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from .dpmsolver_multistep import convert_dpm_output, normalize_solver_config
from .multistep_math import NoiseLevel, dpm_solver_update, last_sigma
from .schedule_math import sigma_kind
from .scheduling_utils import SchedulerOutput
from .solver_base import SolverSchedulerBase

logger = logging.getLogger(__name__)


def singlestep_orders(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The solver order used at each step: cycles 1, 2, ..., order (ending lower when asked)."""
    if not 1 <= order <= 3:
        raise ValueError(f"solver_order must be 1, 2 or 3, got {order}")
    cycle = list(range(1, order + 1))
    full, rest = divmod(steps, order)
    if not lower_order_final:
        orders = cycle * full
    elif order == 1 or rest:
        orders = cycle * full + cycle[:rest]
    else:
        orders = cycle * (full - 1) + cycle[:-1] + [1]
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(SolverSchedulerBase):
    """Singlestep DPM-Solver / DPM-Solver++ (orders 1-3, ODE or sde-dpmsolver++)."""

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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        normalize_solver_config(self, ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"))
        if self.config.algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError("final_sigmas_type='zero' needs a dpmsolver++ algorithm_type; use 'sigma_min' with dpmsolver")
        self.flow_shift = flow_shift
        self._init_tables()
        self.sample = None
        self.order_list = self._order_list(num_train_timesteps)

    def _order_list(self, steps: int) -> list[int]:
        cfg = self.config
        return singlestep_orders(steps, cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type == "zero")

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The solver order of each of ``num_inference_steps`` steps."""
        return self._order_list(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the inference timesteps and sigmas (or pass explicit integer ``timesteps``)."""
        cfg = self.config
        self._apply_mu(mu)
        kind = sigma_kind(cfg)
        timesteps = self._given_or_spaced_timesteps(num_inference_steps, timesteps, kind, "linspace")
        num_inference_steps = num_inference_steps or len(timesteps)
        sigmas, timesteps = self._inference_sigmas(kind, timesteps, num_inference_steps, kind == "karras")
        sigmas = np.concatenate([sigmas, [last_sigma(cfg.final_sigmas_type, self.alphas_cumprod)]])
        self._set_schedule(sigmas, timesteps, device)
        self.num_inference_steps = num_inference_steps
        self.sample = None
        if not cfg.lower_order_final and (num_inference_steps % cfg.solver_order or cfg.final_sigmas_type == "zero"):
            logger.warning("setting lower_order_final=True: needed for %d steps of order %d with final_sigmas_type=%r",
                           num_inference_steps, cfg.solver_order, cfg.final_sigmas_type)
            self.register_to_config(lower_order_final=True)
        self.order_list = self._order_list(num_inference_steps)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The model output as the solver's working prediction (x_0 for ++, eps otherwise)."""
        if sample is None:
            raise ValueError("convert_model_output needs sample=")
        return convert_dpm_output(self, model_output, sample, self.sigmas[self._step_index])

    def _update(self, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        """Order-k step from the macro step's start sample, at sigmas[i - k + 1], to sigmas[i + 1]."""
        i, flow = self._step_index, self._flow
        target = NoiseLevel(self.sigmas[i + 1], flow)
        s = [NoiseLevel(self.sigmas[i - k], flow) for k in range(order)]
        m = self.model_outputs[::-1]
        base = s[-1]
        h = target.lam - base.lam
        if order == 1:
            terms = [("D0", m[0])]
        elif order == 2:
            r0 = (s[0].lam - s[1].lam) / h
            rule = "mid" if self.config.solver_type == "midpoint" else "phi2"
            terms = [("D0", m[1]), (rule, (1.0 / r0) * (m[0] - m[1]))]
        else:
            r0, r1 = (s[0].lam - s[2].lam) / h, (s[1].lam - s[2].lam) / h
            d1_0, d1_1 = (1.0 / r1) * (m[1] - m[2]), (1.0 / r0) * (m[0] - m[2])
            if self.config.solver_type == "midpoint":
                terms = [("D0", m[2]), ("phi2", d1_1)]
            else:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                terms = [("D0", m[2]), ("phi2", d1), ("phi3", d2)]
        return dpm_solver_update(self.config.algorithm_type, self.sample, base, target, h, terms, noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True):
        """Advance ``sample`` one step; sde-dpmsolver++ draws noise from ``generator``."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        converted = self.convert_model_output(model_output, sample=sample)
        self._remember(converted)
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(converted.shape, generator=generator, device=converted.device, dtype=converted.dtype)
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:  # fewer outputs than the order (e.g. after begin_index)
            order -= 1
        if order == 1:
            self.sample = sample
        prev_sample = self._update(order, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
