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
# the reference's DPM2 set-up is quadratic in num_train_timesteps (slow at 1000), so DPM2 tests use 200
SMALL = {"num_train_timesteps": 200}
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
    if steps is not None:
        scheduler.set_timesteps(steps, **(set_kwargs or {}))
    else:
        scheduler.set_timesteps(**(set_kwargs or {}))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen) * getattr(scheduler, "init_noise_sigma", 1.0)
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range") \
        if isinstance(scheduler, diffusekit.SchedulerMixin) else \
        scheduler.config.get("variance_type") in ("learned", "learned_range")
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = fake_model(model_in, t, SHAPE[1] * (2 if learned else 1))
        extra = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **extra, **(step_kwargs or {})).prev_sample
    return x


def check_parity(name, config, steps, set_kwargs=None, step_kwargs=None):
    try:
        ref = getattr(diffusers, name)(**config)
        expected = sample_loop(ref, steps, set_kwargs, step_kwargs)
    except (ValueError, NotImplementedError, IndexError) as err:  # the reference refuses this: so must we
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
SMALL_SIGMA_KEYS = {**SIGMA_KEYS, "trained_betas": [np.linspace(1e-4, 0.02, 200).tolist()]}
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
    *cases("KDPM2DiscreteScheduler", variants(SMALL, SMALL_SIGMA_KEYS), [1, 4, 10]),
    *cases("KDPM2AncestralDiscreteScheduler", variants(SMALL, SMALL_SIGMA_KEYS), [1, 4, 10]),
    *cases("EDMEulerScheduler", variants({}, {"sigma_schedule": ["exponential"], "prediction_type": ["v_prediction"],
                                              "final_sigmas_type": ["sigma_min"], "rho": [5.0], "sigma_min": [0.02],
                                              "sigma_max": [20.0], "sigma_data": [1.0]}), [1, 4, 10, 25]),
    *cases("EDMEulerScheduler", [{}], [None], {"sigmas": torch.tensor([0.0, 0.3, 0.7, 1.0])}),
    *cases("EDMEulerScheduler", [{}], [10], None, {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 30.0}),
    *cases("LCMScheduler", variants({}, {**BETAS, **PRED3, **CLIP, "clip_sample": [True], "set_alpha_to_one": [False],
                                         "original_inference_steps": [25], "timestep_scaling": [5.0],
                                         "rescale_betas_zero_snr": [True]}), [1, 4, 10]),
    *cases("LCMScheduler", [{}], [4], {"strength": 0.5}),
    *cases("LCMScheduler", [{}], [None], {"timesteps": [999, 759, 499, 259]}),
    *cases("FlowMatchEulerDiscreteScheduler", variants({}, {"shift": [3.0], "invert_sigmas": [True],
                                                            "shift_terminal": [0.1], **SIGMAS,
                                                            "stochastic_sampling": [True]}), [1, 4, 10, 25]),
    *cases("FlowMatchEulerDiscreteScheduler", variants({"use_dynamic_shifting": True},
                                                       {"time_shift_type": ["linear"], "shift_terminal": [0.2]}),
           [4, 10], {"mu": 0.8}),
    *cases("FlowMatchEulerDiscreteScheduler", [{"shift": 3.0}], [None], {"sigmas": [1.0, 0.75, 0.5, 0.25]}),
    *cases("FlowMatchEulerDiscreteScheduler", [{"shift": 3.0}], [None], {"timesteps": [1000.0, 700.0, 400.0, 100.0]}),
    *cases("FlowMatchEulerDiscreteScheduler", [{}], [None], {"sigmas": [1.0, 0.6, 0.2],
                                                             "timesteps": [990.0, 600.0, 210.0]}),
]


@pytest.mark.parametrize("name, config, steps, set_kwargs, step_kwargs", PARITY)
def test_sampling_loop_matches_reference(name, config, steps, set_kwargs, step_kwargs):
    check_parity(name, config, steps, set_kwargs, step_kwargs)


ALL = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
       "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
       "KDPM2AncestralDiscreteScheduler", "EDMEulerScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler"]
NOISE_CONFIGS = [{}, {"beta_schedule": "scaled_linear"}]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("begin", [None, 2])
def test_add_noise_and_velocity_match(name, begin):
    config = SMALL if name.startswith("KDPM2") else {}
    ref, ours = getattr(diffusers, name)(**config), getattr(diffusekit, name)(**config)
    for s in (ref, ours):
        s.set_timesteps(8)
        if begin is not None and hasattr(s, "set_begin_index"):
            s.set_begin_index(begin)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = ref.timesteps[[2, 5]]
    method = "scale_noise" if name.startswith("FlowMatch") else "add_noise"
    torch.testing.assert_close(getattr(ours, method)(x0, t, noise) if method == "scale_noise"
                               else ours.add_noise(x0, noise, t),
                               getattr(ref, method)(x0, t, noise) if method == "scale_noise"
                               else ref.add_noise(x0, noise, t))
    if hasattr(ref, "get_velocity"):
        torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
                                  "HeunDiscreteScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler"])
@pytest.mark.parametrize("use_begin_index", [False, True])
def test_img2img_loop_from_the_middle(name, use_begin_index):
    """A loop over the tail of the schedule (as img2img runs) matches, with and without set_begin_index."""
    config = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    results = []
    for lib in (diffusers, diffusekit):
        s = getattr(lib, name)(**config)
        s.set_timesteps(10)
        start = 4 * s.order
        if use_begin_index and hasattr(s, "set_begin_index"):  # the reference PNDM has none: ours must agree
            s.set_begin_index(start)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(SHAPE, generator=gen)
        for t in s.timesteps[start:]:
            x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            kwargs = {"generator": gen} if "generator" in inspect.signature(s.step).parameters else {}
            x = s.step(fake_model(x_in, t), t, x, **kwargs).prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


COMPATIBLE_PAIRS = [("DDPMScheduler", "EulerDiscreteScheduler"), ("DDIMScheduler", "DPMSolverMultistepScheduler"),
                    ("PNDMScheduler", "LMSDiscreteScheduler"), ("EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"),
                    ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"), ("LCMScheduler", "DDIMScheduler")]


@pytest.mark.parametrize("source, target", COMPATIBLE_PAIRS)
def test_from_config_between_compatible_schedulers(source, target):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, **SMALL}
    ours = getattr(diffusekit, target).from_config(getattr(diffusekit, source)(**config).config)
    ref = getattr(diffusers, target).from_config(getattr(diffusers, source)(**config).config)
    shared = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: ours.config[k] for k in shared} == json.loads(json.dumps(shared))
    if source != "LCMScheduler":
        assert target in [c.__name__ for c in getattr(diffusekit, source)().compatibles]


@pytest.mark.parametrize("name", ALL)
def test_config_files_are_read_both_ways(name, tmp_path):
    config = dict(SMALL) if name in ("EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler") \
        else {"beta_schedule": "scaled_linear", **SMALL}
    ours = getattr(diffusekit, name)(**config)
    ours.save_pretrained(tmp_path / "ours")
    ref = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    public = [k for k in ours.config if not k.startswith("_")]
    assert public and {k: ref.config[k] for k in public} == {k: ours.config[k] for k in public}
    getattr(diffusers, name)(**config).save_pretrained(tmp_path / "ref")
    back = getattr(diffusekit, name).from_pretrained(tmp_path / "ref")
    assert {k: back.config[k] for k in public} == {k: ours.config[k] for k in public}
    assert (tmp_path / "ours" / "scheduler_config.json").exists()
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name
