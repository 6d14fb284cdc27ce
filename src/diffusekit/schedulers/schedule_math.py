"""The math schedulers share, kept in one place: beta schedules, alphas and sigmas, sigma ramps
(Karras, exponential, beta), timestep spacing, sigma <-> timestep interpolation, thresholding.

Dtypes follow the reference exactly (betas in float32 torch, sigma ramps in float64 numpy), since
parity to 1e-5 depends on where the rounding happens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..utils import randn_tensor


# -- training noise schedule -------------------------------------------------------------------

def _alpha_bar(kind: str):
    if kind == "cosine":
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(t * -12.0)
    if kind == "laplace":
        def laplace(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))
        return laplace
    raise ValueError(f"unknown alpha_transform_type {kind!r}; expected cosine, exp or laplace")


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine") -> torch.Tensor:
    """Betas that discretise a continuous cumulative-alpha curve ``alpha_bar(t)`` on [0, 1]."""
    alpha_bar = _alpha_bar(alpha_transform_type)
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas=None,
) -> torch.Tensor:
    """The training betas for a config's ``beta_schedule`` (or its explicit ``trained_betas``)."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule == "exp":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="exp")
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear, squaredcos_cap_v2, "
        "exp, laplace or sigmoid"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (arXiv:2305.08891, Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def training_tables(config, finite_last_sigma: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(betas, alphas, alphas_cumprod)`` of a config (``beta_schedule``, ``trained_betas``,
    ``rescale_betas_zero_snr``). ``finite_last_sigma``: with zero-SNR rescaling, the last
    alphas_cumprod becomes 2**-24 instead of 0 so that the sigma views stay finite."""
    betas = make_betas(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end,
                       config.get("trained_betas"))
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    if zero_snr and finite_last_sigma:
        alphas_cumprod[-1] = 2**-24
    return betas, alphas, alphas_cumprod


# -- sigmas ----------------------------------------------------------------------------------------

def sigmas_from_alphas_cumprod(alphas_cumprod) -> np.ndarray | torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): the noise level of the variance-exploding view."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) ramp: uniform in sigma^(1/rho), from sigma_max down to sigma_min."""
    return karras_at(np.linspace(0, 1, n), sigma_min, sigma_max, rho)


def karras_at(ramp, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """The Karras ramp at points ``ramp`` in [0, 1] (0 -> sigma_max, 1 -> sigma_min)."""
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas uniform in log space, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution (arXiv:2407.12173)."""
    from scipy.stats import beta as beta_dist  # only this schedule needs scipy

    quantiles = beta_dist.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def sigma_ramp(kind: str | None, sigmas, n: int, sigma_min: float | None = None,
               sigma_max: float | None = None) -> np.ndarray:
    """Resample a descending sigma schedule as ``kind`` ("karras", "exponential", "beta") with n points.

    The end points default to the schedule's own last and first sigma.
    """
    low = sigma_min if sigma_min is not None else float(sigmas[-1])
    high = sigma_max if sigma_max is not None else float(sigmas[0])
    if kind == "karras":
        return karras_sigmas(low, high, n)
    if kind == "exponential":
        return exponential_sigmas(low, high, n)
    if kind == "beta":
        return beta_sigmas(low, high, n)
    raise ValueError(f"unknown sigma schedule {kind!r}")


def sigma_kind(config) -> str | None:
    """Which of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas a config turns on."""
    chosen = [k for k in ("karras", "exponential", "beta") if config.get(f"use_{k}_sigmas", False)]
    if len(chosen) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set, got {chosen}")
    return chosen[0] if chosen else None


def sigma_to_t(sigma, log_sigmas):
    """The fractional training timestep of each sigma, by linear interpolation in log-sigma.

    numpy in, numpy out; torch tensors are computed in their own dtype (the reference computes its
    DPM2 midpoint timesteps in float32 torch, its other timesteps in numpy)."""
    if not isinstance(sigma, torch.Tensor):
        sigma = np.asarray(sigma)
        return sigma_to_t(torch.from_numpy(sigma), torch.from_numpy(np.asarray(log_sigmas))).numpy().reshape(sigma.shape)
    log_sigma = sigma.clamp(min=1e-10).log()
    dists = log_sigma[None] - log_sigmas.reshape(-1, *[1] * log_sigma.ndim)
    low_idx = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


# -- inference timesteps -------------------------------------------------------------------------

def spaced_timesteps(
    spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0,
    dtype=np.int64, round_linspace: bool = True,
) -> np.ndarray:
    """Descending inference timesteps for ``timestep_spacing`` "linspace", "leading" or "trailing".

    Discrete-time schedulers round linspace to integers; sigma-based ones keep it fractional
    (``round_linspace=False``, float32), as the reference does.
    """
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps ({num_train_timesteps})"
        )
    if spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=np.float64 if round_linspace else np.float32)
        steps = steps.round() if round_linspace else steps
        return steps[::-1].copy().astype(dtype)
    if spacing == "leading":
        ratio = num_train_timesteps // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(dtype)
        return steps + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        steps = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(dtype)
        return steps - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected linspace, leading or trailing")


# -- sample manipulation -------------------------------------------------------------------------

def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): clamp each sample to its ``ratio`` quantile s and divide by s."""
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    flat = sample.float() if dtype not in (torch.float32, torch.float64) else sample
    flat = flat.reshape(batch, channels * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-batch vector so it broadcasts over ``like``'s trailing dimensions."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def add_noise_alphas(original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a) x_0 + sqrt(1 - a) noise, with a = alphas_cumprod[t]."""
    alphas_cumprod = alphas_cumprod.to(device=original.device, dtype=original.dtype)
    timesteps = timesteps.to(original.device)
    a = alphas_cumprod[timesteps]
    return broadcast_to(a**0.5, original) * original + broadcast_to((1 - a) ** 0.5, original) * noise


def velocity_alphas(sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = sqrt(a) noise - sqrt(1 - a) x_0 (Salimans & Ho, 2022)."""
    alphas_cumprod = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    timesteps = timesteps.to(sample.device)
    a = alphas_cumprod[timesteps]
    return broadcast_to(a**0.5, sample) * noise - broadcast_to((1 - a) ** 0.5, sample) * sample


# -- discrete sigma schedules (k-diffusion view of a DDPM) -----------------------------------------

def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The training sigmas, ascending in t, as float32 numpy (computed in torch like the reference)."""
    return np.array(sigmas_from_alphas_cumprod(alphas_cumprod))


def sigmas_for_timesteps(timesteps: np.ndarray, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Sigmas at (fractional) timesteps, interpolated linearly in t from the training sigmas."""
    sigmas = train_sigmas(alphas_cumprod)
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def resample_sigmas(kind: str | None, sigmas: np.ndarray, timesteps: np.ndarray, alphas_cumprod: torch.Tensor,
                    n: int, sigma_min: float | None = None, sigma_max: float | None = None):
    """Apply a Karras/exponential/beta ramp (``kind``; None keeps the schedule) and map the new
    sigmas back to fractional timesteps. Returns ``(sigmas, timesteps)``."""
    if kind is None:
        return sigmas, timesteps
    sigmas = sigma_ramp(kind, sigmas, n, sigma_min, sigma_max)
    return sigmas, sigma_to_t(sigmas, np.log(train_sigmas(alphas_cumprod)))


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """k-diffusion ``get_ancestral_step``: split a move to ``sigma_to`` into a deterministic part
    ``sigma_down`` and fresh noise of size ``sigma_up``."""
    sigma_up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def to_denoised(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """The clean-sample estimate x0 from a model output on the variance-exploding scale
    (``sample`` = x0 + sigma * noise)."""
    if prediction_type == "v_prediction":  # v is defined on the unit-variance sample alpha_t * x
        alpha_t, sigma_t = alpha_sigma(sigma)
        return x0_from_output(model_output, sample * alpha_t, alpha_t, sigma_t, prediction_type)
    return x0_from_output(model_output, sample, 1.0, sigma, prediction_type)


def reject_integer_timestep(timestep) -> None:
    """ValueError for an int timestep (likely a loop index) where the schedule holds fractional ones."""
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor)
                                     and timestep.dtype in (torch.int32, torch.int64)):
        raise ValueError("pass one of scheduler.timesteps as the timestep, not an integer index")


def churn(sample: torch.Tensor, sigma, num_sigmas: int, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float, generator, like: torch.Tensor):
    """Karras et al. (2022) Alg. 2 "churn": for sigma in [s_tmin, s_tmax], raise the noise level to
    sigma_hat = (1 + gamma) sigma with fresh noise (shaped and typed as ``like``). Returns
    ``(sample, sigma_hat)``."""
    gamma = min(s_churn / (num_sigmas - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = randn_tensor(like.shape, dtype=like.dtype, device=like.device, generator=generator)
        sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return sample, sigma_hat


def to_d(sample: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - x0) / sigma."""
    return (sample - denoised) / sigma


def add_noise_sigmas(original: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                     step_indices: list[int]) -> torch.Tensor:
    """Variance-exploding forward noise x = x0 + sigma * noise at the given schedule positions."""
    sigma = sigmas.to(device=original.device, dtype=original.dtype)[step_indices]
    return original + noise * broadcast_to(sigma, original)


# -- flow matching ----------------------------------------------------------------------------------

def shift_sigmas(sigmas, shift: float):
    """Resolution shift of flow-matching sigmas: s * shift / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(kind: str, mu: float, sigma: float, t):
    """Dynamic (resolution dependent) time shift with parameter ``mu``: "exponential" or "linear"."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError(f"unknown time_shift_type {kind!r}; expected exponential or linear")


def stretch_to_terminal(t, terminal: float):
    """Rescale a descending schedule so that its last value becomes ``terminal``."""
    one_minus = 1 - t
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


# -- model output conversion (x_t = alpha_t x0 + sigma_t noise) -------------------------------------

def alpha_sigma(sigma, flow: bool = False):
    """(alpha_t, sigma_t) of a noise level ``sigma`` (variance-exploding view, or flow matching's)."""
    if flow:
        return 1 - sigma, sigma
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def x0_from_output(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t,
                   prediction_type: str) -> torch.Tensor:
    """The clean-sample estimate x0 from an epsilon, sample or v prediction at ``sample`` = x_t."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type in ("sample", "original_sample"):
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, sample or v_prediction")


def noise_from_output(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t,
                      prediction_type: str) -> torch.Tensor:
    """The noise estimate from an epsilon, sample or v prediction at ``sample`` = x_t."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(f"prediction_type {prediction_type!r} cannot give a noise prediction; use epsilon, sample "
                     "or v_prediction")


def x0_from_alpha(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod, prediction_type: str) -> torch.Tensor:
    """Clean-sample estimate x0 from a model output, with alpha_prod = alphas_cumprod[t]."""
    return x0_from_output(model_output, sample, alpha_prod**0.5, (1 - alpha_prod) ** 0.5, prediction_type)


def eps_from_alpha(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod, prediction_type: str) -> torch.Tensor:
    """Noise estimate with alpha_prod = alphas_cumprod[t] (for epsilon models, the output itself)."""
    return noise_from_output(model_output, sample, alpha_prod**0.5, (1 - alpha_prod) ** 0.5, prediction_type)


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, alpha_prod_prev, std_dev=0.0) -> torch.Tensor:
    """DDIM eq. (12) without its noise term: sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps."""
    return alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev - std_dev**2) ** 0.5 * eps


def ddpm_posterior_mean(x0: torch.Tensor, sample: torch.Tensor, alpha_prod_t, alpha_prod_prev, alpha=None,
                        beta=None) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x0) (DDPM eq. 7), with alpha_prod = alphas_cumprod at t and t - 1; the
    step's ``alpha`` defaults to their ratio and ``beta`` to 1 - alpha."""
    alpha = alpha_prod_t / alpha_prod_prev if alpha is None else alpha
    beta = 1 - alpha if beta is None else beta
    beta_prod_t = 1 - alpha_prod_t
    return (alpha_prod_prev**0.5 * beta) / beta_prod_t * x0 + alpha**0.5 * (1 - alpha_prod_prev) / beta_prod_t * sample


def batch_alphas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, stride: int, like: torch.Tensor):
    """``(alpha_prod_t, alpha_prod_prev)`` per sample of a batch at its own timestep and at
    ``timestep - stride`` (1 before t = 0), shaped to broadcast over ``like``."""
    t = timesteps.to(like.device).view(-1, *[1] * (like.ndim - 1))
    table = alphas_cumprod.to(like.device)
    prev = t - stride
    return table[t], torch.where(prev < 0, table.new_ones(()), table[prev.clamp(min=0)])


def clip_settings(config) -> tuple:
    """What :func:`clip_x0` needs from a config, as plain constants (a compiled step guards on them by value)."""
    if config.get("thresholding", False):
        return ("threshold", config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.get("clip_sample", False):
        return ("clip", config.clip_sample_range)
    return ("none",)


def clip_x0(x0: torch.Tensor, settings: tuple) -> torch.Tensor:
    """Dynamic thresholding, plain clipping or nothing, as :func:`clip_settings` decided."""
    if settings[0] == "threshold":
        return threshold_sample(x0, settings[1], settings[2])
    if settings[0] == "clip":
        return x0.clamp(-settings[1], settings[1])
    return x0


def clip_denoised(x0: torch.Tensor, config) -> torch.Tensor:
    """Dynamic thresholding or plain clipping of x0, as the config's thresholding/clip_sample ask."""
    return clip_x0(x0, clip_settings(config))


def log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geometric mean exp((log a + log b) / 2), the midpoint DPM-Solver-2 evaluates at."""
    return a.log().lerp(b.log(), 0.5).exp()


def repeat_inner(values: torch.Tensor) -> torch.Tensor:
    """``[v0, v1, v1, ..., vn, vn, vn]``: the per-call layout of a two-call-per-step solver."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


# -- linear multistep ----------------------------------------------------------------------------

def adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """Explicit Adams-Bashforth extrapolation of the last 1-4 derivative values (oldest first), as
    PLMS (PNDM) and iPNDM combine their stored model outputs."""
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return 1 / 24 * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
