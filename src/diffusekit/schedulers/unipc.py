"""UniPC (Zhao et al. 2023, arXiv:2302.04867): a multistep predictor (UniP) followed, at the next
step, by a corrector (UniC) that reuses the new model evaluation, with B(h) = h (bh1) or e^h - 1 (bh2)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .multistep_math import NoiseLevel, PREDICTION_TYPES, check_prediction_type, last_sigma, predict_data, predict_noise, ramp_schedule, solver_timesteps, threshold_data
from .schedule_math import shift_sigmas, sigma_kind, stretch_to_terminal, time_shift, train_sigmas
from .scheduling_utils import SchedulerOutput
from .solver_base import SolverSchedulerBase


def unipc_weights(h, rks: torch.Tensor, order: int, predict_x0: bool, solver_type: str):
    """h*phi_1(h), B(h) and the linear system (R, b) whose solution weights the past differences."""
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.stack(rhs)


def weighted_sum(rhos: torch.Tensor, diffs: list[torch.Tensor]) -> torch.Tensor:
    """sum_k rhos[k] * diffs[k] over batched tensors."""
    return torch.einsum("k,bkc...->bc...", rhos, torch.stack(diffs, dim=1))


class UniPCMultistepScheduler(SolverSchedulerBase):
    """UniPC predictor-corrector, orders 1-3, in data (predict_x0) or noise prediction."""

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = (),
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        if solver_type in ("midpoint", "heun", "logrho"):
            self.register_to_config(solver_type="bh2")
        elif solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be bh1 or bh2, got {solver_type!r}")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal needs use_flow_sigmas=True")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        check_prediction_type(prediction_type, PREDICTION_TYPES if predict_x0 else PREDICTION_TYPES[:3])
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self._init_tables()
        self.last_sample = None
        self.this_order = 1

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None) -> None:
        """Choose the inference timesteps and sigmas; explicit ``sigmas`` need use_flow_sigmas."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting=True")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError("sigmas can only be passed with use_flow_sigmas=True")
            num_inference_steps = len(sigmas)
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas")
        n, big_n = num_inference_steps, cfg.num_train_timesteps
        timesteps = solver_timesteps(cfg.timestep_spacing, n, big_n, steps_offset=cfg.steps_offset)
        kind = sigma_kind(cfg)
        if kind is not None:
            base = train_sigmas(self.alphas_cumprod) if sigmas is None else np.asarray(sigmas)
            sigmas, timesteps = ramp_schedule(kind, base, n, cfg)
            if kind == "karras" and cfg.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                timesteps = sigmas * big_n
            elif kind == "karras":
                timesteps = timesteps.round()
            sigma_last = sigmas[-1]
        elif cfg.use_flow_sigmas:
            sigmas = np.linspace(1, 1 / big_n, n + 1)[:-1] if sigmas is None else np.asarray(sigmas)
            if cfg.use_dynamic_shifting:
                sigmas = time_shift(cfg.time_shift_type, mu, 1.0, sigmas)
            else:
                sigmas = shift_sigmas(sigmas, cfg.flow_shift)
            if cfg.shift_terminal:
                sigmas = stretch_to_terminal(sigmas, cfg.shift_terminal)
            sigmas = np.array(sigmas)
            if np.fabs(sigmas[0] - 1) < 1e-6:  # keep alpha_t = 1 - sigma away from zero
                sigmas[0] -= 1e-6
            timesteps = sigmas * big_n
            sigma_last = sigmas[-1]
        else:
            sigmas = np.interp(timesteps, np.arange(0, big_n), train_sigmas(self.alphas_cumprod))
            sigma_last = last_sigma("sigma_min", self.alphas_cumprod)
        sigma_last = 0 if cfg.final_sigmas_type == "zero" else sigma_last
        self._set_schedule(np.concatenate([sigmas, [sigma_last]]), timesteps, device)
        self.last_sample = None
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """x_0 prediction (thresholded if asked) when predict_x0, else eps prediction."""
        if sample is None:
            raise ValueError("convert_model_output needs sample=")
        sigma, flow, kind = self.sigmas[self._step_index], self._flow, self.config.prediction_type
        if self.predict_x0:
            return threshold_data(predict_data(model_output, sample, sigma, kind, flow), self.config)
        return predict_noise(model_output, sample, sigma, kind, flow)

    def _differences(self, at: int, order: int, s0: NoiseLevel, h, device):
        """Scaled differences (m_k - m0) / r_k of older outputs at sigmas[at - k], and the r_k (plus 1)."""
        m0, rks, diffs = self.model_outputs[-1], [], []
        for k in range(1, order):
            level = NoiseLevel(self.sigmas[at - k].to(device), self._flow)
            rk = (level.lam - s0.lam) / h
            rks.append(rk)
            diffs.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), device=device))
        return torch.stack(rks), diffs

    def _base_update(self, x, s0: NoiseLevel, t: NoiseLevel, h_phi_1):
        if self.predict_x0:
            return t.sigma / s0.sigma * x - t.alpha * h_phi_1 * self.model_outputs[-1], t.alpha
        return t.alpha / s0.alpha * x - t.sigma * h_phi_1 * self.model_outputs[-1], t.sigma

    def _predict(self, model_output, timestep, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: order-k predictor from sigmas[i] to sigmas[i + 1]."""
        if self.solver_p is not None:
            return self.solver_p.step(model_output, timestep, x).prev_sample
        i, device = self._step_index, x.device
        t, s0 = NoiseLevel(self.sigmas[i + 1].to(device), self._flow), NoiseLevel(self.sigmas[i].to(device), self._flow)
        h = t.lam - s0.lam
        rks, diffs = self._differences(i, order, s0, h, device)
        h_phi_1, b_h, rows, rhs = unipc_weights(h, rks, order, self.predict_x0, self.config.solver_type)
        x_t, scale = self._base_update(x, s0, t, h_phi_1)
        if diffs:
            if order == 2:
                rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
            else:
                rhos = torch.linalg.solve(rows[:-1, :-1], rhs[:-1]).to(device).to(x.dtype)
            x_t = x_t - scale * b_h * weighted_sum(rhos, diffs)
        return x_t.to(x.dtype)

    def _correct(self, model_t: torch.Tensor, last_sample: torch.Tensor, this_sample: torch.Tensor, order: int):
        """UniC: redo the step from sigmas[i - 1] to sigmas[i] using the new output ``model_t``."""
        i, device = self._step_index, this_sample.device
        t, s0 = NoiseLevel(self.sigmas[i].to(device), self._flow), NoiseLevel(self.sigmas[i - 1].to(device), self._flow)
        h = t.lam - s0.lam
        rks, diffs = self._differences(i - 1, order, s0, h, device)
        h_phi_1, b_h, rows, rhs = unipc_weights(h, rks, order, self.predict_x0, self.config.solver_type)
        x = last_sample
        if order == 1:
            rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos = torch.linalg.solve(rows, rhs).to(device).to(x.dtype)
        x_t, scale = self._base_update(x, s0, t, h_phi_1)
        correction = rhos[-1] * (model_t - self.model_outputs[-1])
        if diffs:
            correction = weighted_sum(rhos[:-1], diffs) + correction
        return (x_t - scale * b_h * correction).to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Correct ``sample`` with this model output (UniC), then predict the next one (UniP)."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg, i = self.config, self._step_index
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self._correct(converted, self.last_sample, sample, self.this_order)
        self._remember(converted)
        order = min(cfg.solver_order, len(self.timesteps) - i) if cfg.lower_order_final else cfg.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm up from first order
        self.last_sample = sample
        prev_sample = self._predict(model_output, timestep, sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
