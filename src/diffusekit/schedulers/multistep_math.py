"""Math shared by the exponential-integrator solvers (DPM-Solver, DPM-Solver++, DEIS, UniPC).

A noise level ``sigma`` (variance-exploding view, or the flow-matching sigma) maps to the
variance-preserving pair (alpha_t, sigma_t) and the half log-SNR ``lambda = log(alpha_t / sigma_t)``.
The solvers step in lambda with ``h = lambda_target - lambda_base``. Scalars stay 0-d tensors so
nothing is read back from the device.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import torch

from .schedule_math import (
    alpha_sigma,
    noise_from_output,
    shift_sigmas,
    sigma_ramp,
    sigma_to_t,
    threshold_sample,
    x0_from_output,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


# -- noise levels --------------------------------------------------------------------------------

def half_log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t) - log(sigma_t)."""
    return torch.log(alpha) - torch.log(sigma)


class NoiseLevel:
    """alpha_t, sigma_t and lambda_t of one entry of a scheduler's ``sigmas``."""

    __slots__ = ("alpha", "sigma", "lam")

    def __init__(self, sigma: torch.Tensor, flow: bool = False):
        self.alpha, self.sigma = alpha_sigma(sigma, flow)
        self.lam = half_log_snr(self.alpha, self.sigma)

    @classmethod
    def preconditioned(cls, sigma: torch.Tensor) -> "NoiseLevel":
        """The level of an EDM-preconditioned sample (inputs scaled before the model): alpha_t = 1."""
        level = cls.__new__(cls)
        level.alpha, level.sigma = torch.tensor(1.0), sigma
        level.lam = half_log_snr(level.alpha, sigma)
        return level


# -- model output conversion ---------------------------------------------------------------------

def check_prediction_type(prediction_type: str, allowed=PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {', '.join(allowed)}; got {prediction_type!r}")


def predict_data(model_output, sample, sigma, prediction_type: str, flow: bool = False) -> torch.Tensor:
    """The model's estimate of x_0, from any parameterisation."""
    if prediction_type == "flow_prediction":
        return sample - sigma * model_output
    return x0_from_output(model_output, sample, *alpha_sigma(sigma, flow), prediction_type)


def predict_noise(model_output, sample, sigma, prediction_type: str, flow: bool = False) -> torch.Tensor:
    """The model's estimate of eps, from epsilon, sample or v prediction."""
    return noise_from_output(model_output, sample, *alpha_sigma(sigma, flow), prediction_type)


def threshold_data(x0: torch.Tensor, config) -> torch.Tensor:
    """Dynamic thresholding of an x_0 estimate when the config asks for it."""
    if not config.thresholding:
        return x0
    return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)


def data_to_noise(x0, sample, sigma, flow: bool = False) -> torch.Tensor:
    alpha_t, sigma_t = alpha_sigma(sigma, flow)
    return (sample - alpha_t * x0) / sigma_t


def noise_to_data(eps, sample, sigma, flow: bool = False) -> torch.Tensor:
    alpha_t, sigma_t = alpha_sigma(sigma, flow)
    return (sample - sigma_t * eps) / alpha_t


# -- DPM-Solver exponential integrator --------------------------------------------------------------

def dpm_solver_update(algorithm: str, x, base: NoiseLevel, target: NoiseLevel, h, terms, noise=None):
    """One DPM-Solver(++) step from ``x`` at ``base`` to ``target`` (h = lambda_target - lambda_base).

    ``terms`` are (kind, D) pairs: "D0" (the prediction), "mid" (first difference, midpoint rule),
    "phi2" (first difference, exact phi_2 weight) and "phi3" (second difference). ``algorithm`` is
    dpmsolver++ (data prediction), dpmsolver (noise prediction) or their sde- variants, which add
    ``noise``. Coefficients follow Lu et al. 2022 (arXiv:2211.01095) and the reference's SDE forms.
    """
    a_t, s_t = target.alpha, target.sigma
    if algorithm == "dpmsolver++":
        e = torch.exp(-h) - 1.0
        scale = s_t / base.sigma
        coef = {"D0": -(a_t * e), "mid": -0.5 * (a_t * e), "phi2": a_t * (e / h + 1.0),
                "phi3": -(a_t * ((e + h) / h**2 - 0.5))}
    elif algorithm == "dpmsolver":
        e = torch.exp(h) - 1.0
        scale = a_t / base.alpha
        coef = {"D0": -(s_t * e), "mid": -0.5 * (s_t * e), "phi2": -(s_t * (e / h - 1.0)),
                "phi3": -(s_t * ((e - h) / h**2 - 0.5))}
    elif algorithm == "sde-dpmsolver++":
        e = 1.0 - torch.exp(-2.0 * h)
        scale = s_t / base.sigma * torch.exp(-h)
        coef = {"D0": a_t * e, "mid": 0.5 * (a_t * e), "phi2": a_t * (e / (-2.0 * h) + 1.0),
                "phi3": a_t * ((e - 2.0 * h) / (2.0 * h) ** 2 - 0.5)}
    elif algorithm == "sde-dpmsolver":
        e = torch.exp(h) - 1.0
        scale = a_t / base.alpha
        coef = {"D0": -2.0 * (s_t * e), "mid": -(s_t * e), "phi2": -2.0 * (s_t * (e / h - 1.0))}
    else:
        raise ValueError(f"unknown algorithm_type {algorithm!r}")
    x_t = scale * x
    for kind, d in terms:
        if kind not in coef:
            raise ValueError(f"{algorithm} has no {kind} term (order too high for this algorithm_type)")
        x_t = x_t + coef[kind] * d
    if algorithm == "sde-dpmsolver++":
        x_t = x_t + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    elif algorithm == "sde-dpmsolver":
        x_t = x_t + s_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
    return x_t


def multistep_dpm_update(config, x, levels: list[NoiseLevel], model_outputs: list, noise=None) -> torch.Tensor:
    """Multistep DPM-Solver(++) of order ``len(levels) - 1`` from ``x``: ``levels`` is the target, then
    the current and earlier step points; ``model_outputs`` the converted outputs, oldest first.
    The order-2 difference uses the midpoint rule or Heun's (exact phi_2) as ``config.solver_type`` says."""
    target, s = levels[0], levels[1:]
    m = model_outputs[::-1]
    h = target.lam - s[0].lam
    if len(s) == 1:
        terms = [("D0", m[0])]
    elif len(s) == 2:
        r0 = (s[0].lam - s[1].lam) / h
        rule = "mid" if config.solver_type == "midpoint" else "phi2"
        terms = [("D0", m[0]), (rule, (1.0 / r0) * (m[0] - m[1]))]
    else:
        r0, r1 = (s[0].lam - s[1].lam) / h, (s[1].lam - s[2].lam) / h
        d1_0, d1_1 = (1.0 / r0) * (m[0] - m[1]), (1.0 / r1) * (m[1] - m[2])
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        terms = [("D0", m[0]), ("phi2", d1), ("phi3", d2)]
    return dpm_solver_update(config.algorithm_type, x, s[0], target, h, terms, noise)


def multistep_order(config, step_index: int, num_steps: int, lower_order_nums: int) -> int:
    """The order of a multistep step: limited by the history so far, and lowered at the end of short
    schedules (``lower_order_final``), at the last step for ``euler_at_final`` or a zero final sigma."""
    short = config.lower_order_final and num_steps < 15
    final = step_index == num_steps - 1 and (config.euler_at_final or short
                                              or config.get("final_sigmas_type") == "zero")
    if config.solver_order == 1 or lower_order_nums < 1 or final:
        return 1
    if config.solver_order == 2 or lower_order_nums < 2 or (step_index == num_steps - 2 and short):
        return 2
    return 3


# -- inference schedules -----------------------------------------------------------------------------

def solver_timesteps(spacing: str, n: int, num_train_timesteps: int, last_timestep: int | None = None,
                     steps_offset: int = 0) -> np.ndarray:
    """Descending integer timesteps: n of n + 1 evenly spaced points (the last, t=0, dropped).

    ``last_timestep`` caps the range (lambda_min_clipped); it defaults to num_train_timesteps.
    """
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected linspace, leading or trailing")


def ramp_schedule(kind: str, train_sigmas: np.ndarray, n: int, config) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, fractional timesteps) of n points on a "karras", "exponential", "beta" or "lu"
    (uniform in lambda, Lu et al.) ramp over the training sigmas."""
    log_sigmas = np.log(train_sigmas)
    if kind == "lu":
        lambdas = np.flip(log_sigmas.copy())
        high, low = float(lambdas[0]), float(lambdas[-1])
        sigmas = np.exp(high + np.linspace(0, 1, n) * (low - high))
    else:
        sigmas = sigma_ramp(kind, np.flip(train_sigmas).copy(), n, config.get("sigma_min"), config.get("sigma_max"))
    timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
    return sigmas, timesteps


def flow_sigmas(n: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """n shifted flow-matching sigmas, descending from 1 (shift * s / (1 + (shift - 1) * s))."""
    s = 1.0 - np.linspace(1, 1 / num_train_timesteps, n + 1)
    return np.flip(shift_sigmas(s, shift))[:-1].copy()


def last_sigma(final_sigmas_type: str, alphas_cumprod: torch.Tensor, sigma_min=None):
    """The sigma appended after the last step: 0, or the smallest training sigma."""
    if final_sigmas_type == "zero":
        return 0
    if final_sigmas_type == "sigma_min":
        if sigma_min is not None:
            return sigma_min
        return ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")


def inverse_solver_timesteps(spacing: str, n: int, num_train_timesteps: int, noisiest: int,
                             steps_offset: int = 0) -> np.ndarray:
    """Ascending integer timesteps for inversion: n of n + 1 evenly spaced points from 0 to
    ``noisiest`` (the top one dropped)."""
    if spacing == "linspace":
        return np.linspace(0, noisiest, n + 1).round()[:-1].astype(np.int64)
    if spacing == "leading":
        ratio = (noisiest + 1) // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return solver_timesteps(spacing, n, num_train_timesteps, noisiest + 1)[::-1].copy()
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected linspace, leading or trailing")


# -- SA-Solver (Xue et al., 2023, arXiv:2309.05019) -------------------------------------------------

def _exp_poly(k: int, x, sign: int):
    """x^k + sign k x^(k-1) + k(k-1) x^(k-2) + ...: the polynomial of the k-th exponential moment
    (``sign`` -1 alternates the signs)."""
    total = 0
    for j in range(k + 1):
        coef = sign**j * math.factorial(k) // math.factorial(k - j)
        total = total + (coef * x ** (k - j) if j < k else coef)
    return total


def sa_exponential_integral(k: int, start, end, tau, data_prediction: bool):
    """The integral over lambda in [start, end] of lambda^k times the SA-Solver exponential weight:
    e^((1 + tau^2) lambda) for data prediction, e^(-lambda) for noise prediction."""
    if data_prediction:
        scale = 1 + tau**2
        e, s = scale * end, scale * start
        return torch.exp(e) * (_exp_poly(k, e, -1) - _exp_poly(k, s, -1) * torch.exp(-(e - s))) / scale ** (k + 1)
    return torch.exp(-end) * (_exp_poly(k, start, 1) * torch.exp(end - start) - _exp_poly(k, end, 1))


def _product(values):
    result = values[0]
    for value in values[1:]:
        result = result * value
    return result


def lagrange_coefficients(lambdas: list) -> list[list]:
    """Coefficients (highest power first) of each Lagrange basis polynomial through ``lambdas``:
    signed elementary symmetric sums of the other points over prod(lambda_i - lambda_m)."""
    if len(lambdas) == 1:
        return [[1]]
    rows = []
    for i, li in enumerate(lambdas):
        others = [lm for m, lm in enumerate(lambdas) if m != i]
        denominator = _product([li - lm for lm in others])
        row = [1 / denominator]
        for k in range(1, len(others) + 1):
            symmetric = sum((_product(c) for c in combinations(others, k)), start=0)
            row.append((-symmetric if k % 2 else symmetric) / denominator)
        rows.append(row)
    return rows


def sa_solver_coefficients(start, end, lambdas: list, tau, data_prediction: bool) -> list:
    """Weights of the stored model outputs (at ``lambdas``, newest first) in an SA-Solver step over
    [start, end]: the Lagrange interpolant integrated against the exponential weight."""
    order = len(lambdas)
    weights = []
    for row in lagrange_coefficients(lambdas):
        weight = 0
        for j in range(order):
            weight = weight + row[j] * sa_exponential_integral(order - 1 - j, start, end, tau, data_prediction)
        weights.append(weight)
    return weights


def sa_solver_update(x, base: NoiseLevel, target: NoiseLevel, lambdas: list, outputs: list, noise, tau,
                     data_prediction: bool, order2_shift=None) -> torch.Tensor:
    """One stochastic Adams step from ``x`` at ``base`` to ``target`` with the model ``outputs``
    (newest first) taken at ``lambdas``; ``order2_shift`` (data prediction, order 2) moves weight from
    the older output to the newer, as the reference does for few-step sampling."""
    h = target.lam - base.lam
    weights = sa_solver_coefficients(base.lam, target.lam, lambdas, tau, data_prediction)
    if data_prediction and len(lambdas) == 2 and order2_shift is not None:
        weights = [weights[0] + order2_shift, weights[1] - order2_shift]
    gradient = torch.zeros_like(x)
    for weight, output in zip(weights, outputs):
        if data_prediction:
            gradient = gradient + (1 + tau**2) * target.sigma * torch.exp(-(tau**2) * target.lam) * weight * output
        else:
            gradient = gradient + -(1 + tau**2) * target.alpha * weight * output
    if data_prediction:
        noise_part = target.sigma * torch.sqrt(1 - torch.exp(-2 * tau**2 * h)) * noise
        x_t = torch.exp(-(tau**2) * h) * (target.sigma / base.sigma) * x + gradient + noise_part
    else:
        noise_part = tau * target.sigma * torch.sqrt(torch.exp(2 * h) - 1) * noise
        x_t = (target.alpha / base.alpha) * x + gradient + noise_part
    return x_t.to(x.dtype)
