"""SA-Solver (Xue et al., 2023, arXiv:2309.05019): stochastic Adams predictor-corrector steps in
lambda, with noise of strength ``tau_func(t)`` (by default 1 for t in [200, 800], else 0)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..configuration import register_to_config
from ..utils import randn_tensor
from .multistep_math import NoiseLevel, last_sigma, predict_data, predict_noise, sa_solver_update, threshold_data
from .schedule_math import sigma_kind
from .scheduling_utils import SchedulerOutput
from .solver_base import SolverSchedulerBase

SA_ALGORITHMS = ("data_prediction", "noise_prediction")


def default_tau(t) -> int:
    """Noise only in the middle of the schedule: 1 for 200 <= t <= 800, else 0."""
    return 1 if 200 <= t <= 800 else 0


def _order2_shift(target: NoiseLevel, h, tau, corrector: bool):
    """The reference's order-2 weight adjustment of SA-Solver's data-prediction steps (before the
    predictor divides it by lambda_s0 - lambda_s1)."""
    scale = 1 + tau**2
    rest = (h * scale - 1 + torch.exp(scale * (-h)))
    inner = h / 2 - rest / (scale**2 * h) if corrector else h**2 / 2 - rest / scale**2
    return 1.0 * torch.exp(scale * target.lam) * inner


class SASolverScheduler(SolverSchedulerBase):
    """Stochastic Adams-Bashforth predictor (``predictor_order``) and Adams-Moulton corrector
    (``corrector_order``) on data or noise predictions."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        predictor_order: int = 2,
        corrector_order: int = 2,
        prediction_type: str = "epsilon",
        tau_func: Callable | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "data_prediction",
        lower_order_final: bool = True,
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
        if algorithm_type not in SA_ALGORITHMS:
            raise ValueError(f"algorithm_type must be one of {', '.join(SA_ALGORITHMS)}, got {algorithm_type!r}")
        if algorithm_type == "noise_prediction" and thresholding:  # the reference cannot step this either
            raise ValueError("thresholding is not available with algorithm_type='noise_prediction'")
        self.flow_shift = flow_shift
        self.tau_func = default_tau if tau_func is None else tau_func
        self.predict_x0 = algorithm_type == "data_prediction"
        self._init_tables()

    def _check_orders(self) -> None:
        for name in ("predictor_order", "corrector_order"):
            value = self.config[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
                raise ValueError(f"{name} must be 1, 2, 3 or 4, got {value!r}")

    @property
    def _history_length(self) -> int:
        return max(self.config.predictor_order, self.config.corrector_order - 1)

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self._history_length
        self.timestep_list = [None] * self._history_length
        self.lower_order_nums = 0
        self.last_sample = self.last_noise = None
        self._reset_index()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """Spaced timesteps above ``lambda_min_clipped`` (or a Karras/exponential/beta/flow ramp)."""
        cfg = self.config
        kind = sigma_kind(cfg)
        timesteps = self._given_or_spaced_timesteps(num_inference_steps, None, None, cfg.timestep_spacing,
                                                    cfg.steps_offset)
        sigmas, timesteps = self._inference_sigmas(kind, timesteps, num_inference_steps, kind == "karras")
        final = sigmas[-1] if kind is not None or cfg.use_flow_sigmas else last_sigma("sigma_min", self.alphas_cumprod)
        self._set_schedule(np.concatenate([sigmas, [final]]), timesteps, device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None,
                             **kwargs) -> torch.Tensor:
        """The model output as x_0 (data_prediction) or eps (noise_prediction), thresholded if asked."""
        if sample is None:
            raise ValueError("convert_model_output needs sample=")
        cfg, flow = self.config, self._flow
        sigma = self.sigmas[self._step_index]
        if cfg.prediction_type == "epsilon" and cfg.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]  # drop the predicted variance channels
        if self.predict_x0:
            return threshold_data(predict_data(model_output, sample, sigma, cfg.prediction_type, flow), cfg)
        return predict_noise(model_output, sample, sigma, cfg.prediction_type, flow)

    def _levels(self, *indices: int) -> list[NoiseLevel]:
        return [NoiseLevel(self.sigmas[i], self._flow) for i in indices]

    def _predict(self, sample, noise, order: int, tau):
        i = self._step_index
        target, *points = self._levels(i + 1, *(i - k for k in range(order)))
        base = points[0]
        shift = None
        if order == 2:
            shift = _order2_shift(target, target.lam - base.lam, tau, corrector=False) / (base.lam - points[1].lam)
        return sa_solver_update(sample, base, target, [p.lam for p in points], self.model_outputs[::-1][:order],
                                noise, tau, self.predict_x0, shift)

    def _correct(self, this_output, order: int, tau):
        i = self._step_index
        target, base = self._levels(i, i - 1)
        lambdas = [level.lam for level in self._levels(*(i - k for k in range(order)))]
        outputs = [this_output, *self.model_outputs[::-1]][:order]
        shift = _order2_shift(target, target.lam - base.lam, tau, corrector=True)
        return sa_solver_update(self.last_sample, base, target, lambdas, outputs, self.last_noise, tau,
                                self.predict_x0, shift)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """Correct the last prediction with this model output, then predict the next sample."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        i, cfg, n = self._step_index, self.config, len(self.timesteps)
        converted = self.convert_model_output(model_output, sample=sample)
        if i > 0 and self.last_sample is not None:
            sample = self._correct(converted, self.this_corrector_order, self.tau_func(self.timestep_list[-1]))
        self.model_outputs = [*self.model_outputs[1:], converted]
        self.timestep_list = [*self.timestep_list[1:], timestep]
        noise = randn_tensor(converted.shape, generator=generator, device=converted.device, dtype=converted.dtype)
        predictor, corrector = cfg.predictor_order, cfg.corrector_order
        if cfg.lower_order_final:
            predictor, corrector = min(predictor, n - i), min(corrector, n - i + 1)
        self.this_predictor_order = min(predictor, self.lower_order_nums + 1)
        self.this_corrector_order = min(corrector, self.lower_order_nums + 2)
        self.last_sample, self.last_noise = sample, noise
        prev_sample = self._predict(sample, noise, self.this_predictor_order, self.tau_func(self.timestep_list[-1]))
        self.lower_order_nums = min(self.lower_order_nums + 1, self._history_length)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
