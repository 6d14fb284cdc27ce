"""Parity of diffusekit's schedulers with diffusers 0.42.1: full sampling loops with a smooth fake
model, per config key and value, over several step counts, with the same seeds."""

from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

import diffusekit

SHAPE = (2, 3, 4, 4)
BETAS = {"beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
         "trained_betas": [np.linspace(1e-4, 0.02, 1000).tolist()]}
PRED3 = {"prediction_type": ["epsilon", "v_prediction", "sample"]}
SPACING = {"timestep_spacing": ["linspace", "leading", "trailing"], "steps_offset": [1]}
CLIP = {"clip_sample": [False], "clip_sample_range": [0.5], "thresholding": [True],
        "dynamic_thresholding_ratio": [0.9], "sample_max_value": [1.5]}
SIGMAS = {"use_karras_sigmas": [True], "use_exponential_sigmas": [True], "use_beta_sigmas": [True]}


def variants(base: dict, keys: dict) -> list[dict]:
    """The base config, then one config per (key, value), each on top of ``base``."""
    out = [dict(base)]
    for key, values in keys.items():
        for value in values:
            cfg = {**base, key: value}
            if key in ("dynamic_thresholding_ratio", "sample_max_value"):
                cfg["thresholding"] = True
            out.append(cfg)
    return out


def fake_model(sample: torch.Tensor, t, channels: int = SHAPE[1]) -> torch.Tensor:
    """A smooth deterministic stand-in for a denoiser."""
    t = torch.as_tensor(t, dtype=torch.float32)
    out = torch.sin(0.7 * sample + 0.003 * t) * 0.8 + 0.1 * sample
    return out if channels == sample.shape[1] else torch.cat([out, torch.tanh(out)], dim=1)


def sample_loop(scheduler, steps, set_kwargs=None, step_kwargs=None, seed=0):
    scheduler.set_timesteps(steps, **(set_kwargs or {})) if steps is not None else \
        scheduler.set_timesteps(**(set_kwargs or {}))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range") \
        if isinstance(scheduler, diffusekit.SchedulerMixin) else \
        scheduler.config.get("variance_type") in ("learned", "learned_range")
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = fake_model(model_in, t, SHAPE[1] * (2 if learned else 1))
        extra = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **extra, **(step_kwargs or {})).prev_sample
    return x


def check_parity(name, config, steps, set_kwargs=None, step_kwargs=None):
    try:
        ref = getattr(diffusers, name)(**config)
        expected = sample_loop(ref, steps, set_kwargs, step_kwargs)
    except (ValueError, NotImplementedError) as err:  # the reference refuses this combination: so must we
        with pytest.raises((ValueError, NotImplementedError)):
            sample_loop(getattr(diffusekit, name)(**config), steps, set_kwargs, step_kwargs)
        return f"refused: {type(err).__name__}"
    ours = getattr(diffusekit, name)(**config)
    got = sample_loop(ours, steps, set_kwargs, step_kwargs)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-6, atol=1e-6, check_dtype=False,
                               equal_nan=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    return None


def cases(name, configs, steps, set_kwargs=None, step_kwargs=None):
    return [pytest.param(name, cfg, n, set_kwargs, step_kwargs, id=f"{name}-{i}-{n}")
            for i, cfg in enumerate(configs) for n in steps]


DDPM_KEYS = {**BETAS, "beta_schedule": ["scaled_linear", "squaredcos_cap_v2", "sigmoid"], **PRED3, **SPACING, **CLIP,
             "variance_type": ["fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
             "rescale_betas_zero_snr": [True]}
DDIM_KEYS = {**BETAS, **PRED3, **SPACING, **CLIP, "set_alpha_to_one": [False], "rescale_betas_zero_snr": [True]}
PNDM_KEYS = {**BETAS, "prediction_type": ["v_prediction"], **SPACING, "skip_prk_steps": [True],
             "set_alpha_to_one": [True]}

EULER_KEYS = {**BETAS, **PRED3, **SPACING, **SIGMAS, "interpolation_type": ["log_linear"],
              "final_sigmas_type": ["sigma_min"], "rescale_betas_zero_snr": [True]}
SIGMA_KEYS = {**BETAS, **PRED3, **SPACING, **SIGMAS}
KARRAS_RANGE = {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}

PARITY = [
    *cases("DDPMScheduler", variants({}, DDPM_KEYS), [1, 4, 10]),
    *cases("DDPMScheduler", [{"clip_sample": False}], [None], {"timesteps": [900, 500, 120, 3]}),
    *cases("DDIMScheduler", variants({}, DDIM_KEYS), [1, 4, 10]),
    *cases("DDIMScheduler", [{}, {"prediction_type": "sample"}], [10], None, {"eta": 1.0}),
    *cases("DDIMScheduler", [{}], [10], None, {"eta": 0.5, "use_clipped_model_output": True}),
    *cases("PNDMScheduler", variants({}, PNDM_KEYS), [4, 10, 25]),
    *cases("EulerDiscreteScheduler", variants({}, EULER_KEYS), [1, 4, 10, 25]),
    *cases("EulerDiscreteScheduler", [KARRAS_RANGE, {**KARRAS_RANGE, "use_karras_sigmas": False,
                                                     "use_exponential_sigmas": True},
                                      {"prediction_type": "v_prediction", "timestep_type": "continuous"},
                                      {"interpolation_type": "log_linear", "use_karras_sigmas": True}], [4, 10]),
    *cases("EulerDiscreteScheduler", [{}], [None], {"timesteps": [950.5, 700.0, 300.25, 20.0]}),
    *cases("EulerDiscreteScheduler", [{}], [None], {"sigmas": [14.0, 5.0, 1.5, 0.3, 0.0]}),
    *cases("EulerDiscreteScheduler", [{}], [10], None, {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 8.0}),
    *cases("EulerAncestralDiscreteScheduler", variants({}, {**BETAS, **PRED3, **SPACING,
                                                            "rescale_betas_zero_snr": [True]}), [1, 4, 10, 25]),
    *cases("LMSDiscreteScheduler", variants({}, SIGMA_KEYS), [1, 4, 10, 25]),
    *cases("LMSDiscreteScheduler", [{}], [10], None, {"order": 2}),
    *cases("HeunDiscreteScheduler", variants({}, {**SIGMA_KEYS, "beta_schedule": ["exp", "scaled_linear"],
                                                  "clip_sample": [True], "clip_sample_range": [0.5]}), [1, 4, 10]),
    *cases("HeunDiscreteScheduler", [{}], [None], {"timesteps": [950.0, 700.5, 300.0, 20.0]}),
    *cases("KDPM2DiscreteScheduler", variants({}, SIGMA_KEYS), [1, 4, 10]),
    *cases("KDPM2AncestralDiscreteScheduler", variants({}, SIGMA_KEYS), [1, 4, 10]),
]


@pytest.mark.parametrize("name, config, steps, set_kwargs, step_kwargs", PARITY)
def test_sampling_loop_matches_reference(name, config, steps, set_kwargs, step_kwargs):
    check_parity(name, config, steps, set_kwargs, step_kwargs)
