"""Parity of the schedulers added for drop-in use (TCD, inverse DDIM / DPM-Solver, EDM DPM-Solver, flow
Heun / LCM, parallel DDIM / DDPM, ...) with diffusers 0.42.1: full sampling loops per config option,
with the loop and fake model of test_schedulers_a."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

import diffusekit

from test_schedulers_a import BETAS, DDIM_KEYS, DDPM_KEYS, PRED3, SPACING, cases, check_parity, fake_model, variants
from test_schedulers_b import STEPS, assert_close, both, loop_options, sample_loop

BETAS3 = {**BETAS, "beta_schedule": ["linear", "squaredcos_cap_v2"]}  # TCD refuses the others
LCM_LIKE = {**BETAS3, **PRED3, "set_alpha_to_one": [False], "original_inference_steps": [25],
            "timestep_scaling": [5.0], "rescale_betas_zero_snr": [True], "clip_sample": [True], "thresholding": [True]}

PARITY = [
    *cases("TCDScheduler", variants({}, LCM_LIKE), [1, 4, 10]),
    *[p for eta in (0.0, 0.3, 1.0) for p in cases("TCDScheduler", [{}], [4, 8], None, {"eta": eta})],
    *cases("TCDScheduler", [{}], [4], {"strength": 0.5}),
    *cases("TCDScheduler", [{}], [4], {"original_inference_steps": 100}),
    *cases("TCDScheduler", [{}], [None], {"timesteps": [999, 759, 499, 259]}),
    *cases("FlowMatchHeunDiscreteScheduler", variants({}, {"shift": [3.0], "num_train_timesteps": [500]}), [1, 4, 10]),
    *cases("FlowMatchHeunDiscreteScheduler", [{"shift": 3.0}], [10], None, {"s_churn": 1.0, "s_tmin": 0.2, "s_tmax": 0.8}),
    *cases("FlowMatchLCMScheduler", variants({}, {"shift": [3.0], "invert_sigmas": [True], "shift_terminal": [0.1],
                                                  "use_karras_sigmas": [True], "use_exponential_sigmas": [True],
                                                  "use_beta_sigmas": [True]}), [1, 4, 10]),
    *cases("FlowMatchLCMScheduler", variants({"use_dynamic_shifting": True}, {"time_shift_type": ["linear"]}),
           [4], {"mu": 0.8}),
    *cases("FlowMatchLCMScheduler", [{"shift": 3.0}], [None], {"sigmas": [1.0, 0.75, 0.5, 0.25]}),
    *cases("DDIMParallelScheduler", variants({}, DDIM_KEYS), [1, 4, 10]),
    *cases("DDIMParallelScheduler", [{}], [10], None, {"eta": 0.5, "use_clipped_model_output": True}),
    *cases("DDPMParallelScheduler", variants({}, DDPM_KEYS), [1, 4, 10]),
    *cases("CMStochasticIterativeScheduler", variants({}, {"num_train_timesteps": [18, 151], "sigma_min": [0.02],
                                                           "sigma_max": [20.0], "sigma_data": [1.0], "s_noise": [0.5],
                                                           "rho": [5.0], "clip_denoised": [False]}), [1, 2, 10]),
    *cases("CMStochasticIterativeScheduler", [{}], [None], {"timesteps": [22, 0]}),
    *cases("UnCLIPScheduler", variants({}, {"variance_type": ["learned_range"], "clip_sample": [False],
                                            "clip_sample_range": [0.5], "prediction_type": ["sample"],
                                            "num_train_timesteps": [200]}), [2, 4, 10]),
    *cases("DDIMInverseScheduler", variants({}, {**BETAS3, **PRED3, **SPACING, "clip_sample": [False],
                                                 "clip_sample_range": [0.5], "set_alpha_to_one": [False],
                                                 "rescale_betas_zero_snr": [True]}), [1, 4, 10]),
]


@pytest.mark.parametrize("name, config, steps, set_kwargs, step_kwargs", PARITY)
def test_sampling_loop_matches_reference(name, config, steps, set_kwargs, step_kwargs):
    check_parity(name, config, steps, set_kwargs, step_kwargs)


DPM_INVERSE = [
    {}, {"solver_order": 1}, {"solver_order": 3}, {"solver_type": "heun"}, {"solver_order": 3, "solver_type": "heun"},
    {"algorithm_type": "sde-dpmsolver++"}, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    {"algorithm_type": "dpmsolver"}, {"algorithm_type": "dpmsolver", "solver_order": 3},
    {"algorithm_type": "sde-dpmsolver"}, {"algorithm_type": "dpmsolver", "solver_type": "heun"},
    {"lower_order_final": False}, {"euler_at_final": True},
    {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
    {"prediction_type": "v_prediction"}, {"prediction_type": "sample"},
    {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    {"algorithm_type": "dpmsolver", "prediction_type": "v_prediction"}, {"variance_type": "learned_range"},
    {"thresholding": True, "sample_max_value": 1.5}, {"algorithm_type": "dpmsolver", "thresholding": True},
    {"lambda_min_clipped": -5.1}, {"timestep_spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"}, {"num_train_timesteps": 500},
]


@pytest.mark.parametrize("config", DPM_INVERSE, ids=lambda c: json.dumps(c)[:80])
def test_dpm_multistep_inverse_loop(config):
    """Inverse loops match; the SDE variants give NaN in the reference (noise of sqrt(1 - e^(-2h)) with
    h < 0), and must give NaN in the same places here."""
    stochastic = config.get("algorithm_type", "").startswith("sde")
    options = {**loop_options(config), "begin_index": None}  # the reference has no set_begin_index here
    for steps in STEPS:
        ours, ref = both("DPMSolverMultistepInverseScheduler", config)
        got, expected = sample_loop(ours, steps, stochastic, **options), sample_loop(ref, steps, stochastic, **options)
        if stochastic:
            assert torch.equal(got.isnan(), expected.isnan())
        else:
            assert_close(got, expected)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        assert ours.sigmas.tolist() == pytest.approx(ref.sigmas.tolist(), rel=1e-6)


EDM_DPM = [
    {}, {"solver_order": 1}, {"solver_order": 3}, {"solver_type": "heun"}, {"solver_order": 3, "solver_type": "heun"},
    {"algorithm_type": "sde-dpmsolver++"}, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    {"lower_order_final": False}, {"euler_at_final": True}, {"final_sigmas_type": "sigma_min"},
    {"sigma_schedule": "exponential"},
    {"prediction_type": "v_prediction"}, {"thresholding": True, "sample_max_value": 1.5},
    {"rho": 5.0, "sigma_min": 0.02, "sigma_max": 20.0, "sigma_data": 1.0},
    {"algorithm_type": "deis", "final_sigmas_type": "sigma_min"}, {"solver_type": "bh2"},
]


@pytest.mark.parametrize("config", EDM_DPM, ids=lambda c: json.dumps(c)[:80])
def test_edm_dpm_multistep_loop(config):
    stochastic = config.get("algorithm_type") == "sde-dpmsolver++"
    for steps in STEPS:
        ours, ref = both("EDMDPMSolverMultistepScheduler", config)
        assert_close(sample_loop(ours, steps, stochastic), sample_loop(ref, steps, stochastic))
        torch.testing.assert_close(ours.timesteps, ref.timesteps)


def test_edm_dpm_refuses_what_the_reference_refuses():
    for lib in (diffusers, diffusekit):
        with pytest.raises(ValueError, match="final_sigmas_type"):
            lib.EDMDPMSolverMultistepScheduler(algorithm_type="deis")


@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_flow_lcm_upscaling_loop(mode):
    """With scale_factors, x0 is upscaled between steps: the sample grows as the reference's does."""
    results = []
    for lib in (diffusers, diffusekit):
        scheduler = lib.FlowMatchLCMScheduler(shift=3.0, scale_factors=[1.5, 2.0], upscale_mode=mode)
        scheduler.set_timesteps(3)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 2, 4, 4, generator=gen)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.sin(x) * 0.5, t, x, generator=gen).prev_sample
        results.append(x)
    assert results[1].shape == (1, 2, 8, 8)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


BATCH_KEYS = {**PRED3, "clip_sample": [False], "clip_sample_range": [0.5], "thresholding": [True],
              "timestep_spacing": ["trailing"], "rescale_betas_zero_snr": [True]}
BATCH = [("DDIMParallelScheduler", cfg, kw) for cfg in variants({}, {**BATCH_KEYS, "set_alpha_to_one": [False]})
         for kw in ({}, {"use_clipped_model_output": True})]
BATCH += [("DDPMParallelScheduler", cfg, {}) for cfg in variants({}, {**BATCH_KEYS, "variance_type": ["learned_range"]})]


@pytest.mark.parametrize("name, config, kwargs", BATCH, ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else v)
@pytest.mark.parametrize("steps", [None, 10])
def test_batch_step_no_noise(name, config, kwargs, steps):
    """Every timestep of the schedule stepped at once (t = 0 included, whose previous alpha is 1)."""
    results = []
    for lib in (diffusers, diffusekit):
        scheduler = getattr(lib, name)(**config)
        if steps is not None:
            scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps[:: max(1, len(scheduler.timesteps) // 10)]
        x = torch.randn(len(timesteps), 3, 4, 4, generator=torch.Generator().manual_seed(0))
        channels = 6 if config.get("variance_type") == "learned_range" else 3
        out = fake_model(x, timesteps.view(-1, 1, 1, 1).float(), channels)
        if steps is None and name.startswith("DDIM"):  # both refuse before set_timesteps
            with pytest.raises(ValueError, match="set_timesteps"):
                scheduler.batch_step_no_noise(out, timesteps, x, **kwargs)
            continue
        results.append(scheduler.batch_step_no_noise(out, timesteps, x, **kwargs))
    if results:
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6, equal_nan=True)


SA_SOLVER = [
    {}, {"predictor_order": 1, "corrector_order": 1}, {"predictor_order": 3}, {"predictor_order": 4},
    {"corrector_order": 3}, {"corrector_order": 4, "predictor_order": 3}, {"algorithm_type": "noise_prediction"},
    {"algorithm_type": "noise_prediction", "predictor_order": 3, "corrector_order": 3},
    {"lower_order_final": False}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"},
    {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    {"algorithm_type": "noise_prediction", "prediction_type": "v_prediction"},
    {"thresholding": True, "sample_max_value": 1.5}, {"lambda_min_clipped": -5.1},
    {"timestep_spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
]


@pytest.mark.parametrize("config", SA_SOLVER, ids=lambda c: json.dumps(c)[:80])
def test_sa_solver_loop(config):
    """(variance_type="learned_range" is left out: the reference draws noise with the model output's
    doubled channels and cannot add it; here the noise has the sample's shape.)"""
    for steps in STEPS:
        ours, ref = both("SASolverScheduler", config)
        assert_close(sample_loop(ours, steps, True, **loop_options(config)),
                     sample_loop(ref, steps, True, **loop_options(config)))


@pytest.mark.parametrize("config", [{}, {"variance_type": "learned_range"}, {"prediction_type": "sample"}],
                         ids=lambda c: json.dumps(c))
def test_unclip_pipeline_loop(config):
    """The unCLIP pipelines' loop: each step goes to the next scheduled timestep (prev_timestep)."""
    results = []
    for lib in (diffusers, diffusekit):
        scheduler = lib.UnCLIPScheduler(**config)
        scheduler.set_timesteps(6)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=gen)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            prev = None if i == len(timesteps) - 1 else timesteps[i + 1]
            channels = 6 if config.get("variance_type") == "learned_range" else 3
            x = scheduler.step(fake_model(x, t, channels), t, x, prev_timestep=prev, generator=gen).prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


REPAINT = [({}, (10, 10, 10)), ({"eta": 0.5}, (10, 10, 10)), ({"eta": 1.0, "clip_sample": False}, (25, 5, 3)),
           ({"beta_schedule": "scaled_linear"}, (12, 3, 2)), ({"beta_schedule": "squaredcos_cap_v2"}, (10, 10, 10)),
           ({"beta_schedule": "sigmoid", "eta": 0.3}, (8, 4, 1)), ({"num_train_timesteps": 50}, (60, 10, 2))]


@pytest.mark.parametrize("config, schedule", REPAINT, ids=lambda v: json.dumps(v))
def test_repaint_pipeline_loop(config, schedule):
    """The RePaint pipeline's loop: step down, or undo_step back up where the schedule jumps."""
    steps, jump_length, jump_n_sample = schedule
    results = []
    for lib in (diffusers, diffusekit):
        scheduler = lib.RePaintScheduler(**config)
        scheduler.set_timesteps(steps, jump_length, jump_n_sample)
        gen = torch.Generator().manual_seed(0)
        original = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
        mask = (torch.rand(2, 1, 4, 4, generator=gen) > 0.5).float()
        x = torch.randn(2, 3, 4, 4, generator=gen)
        t_last = scheduler.timesteps[0] + 1
        for t in scheduler.timesteps:
            if t < t_last:
                x = scheduler.step(fake_model(x, t), t, x, original, mask, generator=gen).prev_sample
            else:
                x = scheduler.undo_step(x, t_last, generator=gen)
            t_last = t
        results.append((scheduler.timesteps, x))
    assert results[1][0].tolist() == results[0][0].tolist()
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


VQ = [{"num_vec_classes": 8}, {"num_vec_classes": 5, "num_train_timesteps": 20},
      {"num_vec_classes": 8, "alpha_cum_start": 0.9, "alpha_cum_end": 0.01, "gamma_cum_start": 0.01,
       "gamma_cum_end": 0.9}]


@pytest.mark.parametrize("config", VQ, ids=lambda c: json.dumps(c))
@pytest.mark.parametrize("steps", [1, 10])
def test_vq_diffusion_loop(config, steps):
    """Discrete sampling from all-mask latents with a fake log p(x0 | x_t): same indices and posteriors."""
    classes = config["num_vec_classes"]
    results = []
    for lib in (diffusers, diffusekit):
        scheduler = lib.VQDiffusionScheduler(**config)
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(0)
        x = torch.full((2, 12), classes - 1, dtype=torch.long)
        posteriors = []
        for t in scheduler.timesteps:
            logits = torch.sin(x[:, None, :].float() * torch.arange(1, classes)[None, :, None] + 0.1 * t)
            log_p_x0 = torch.log_softmax(logits, dim=1)
            if t > 0:
                posteriors.append(scheduler.q_posterior(log_p_x0, x, t))
            x = scheduler.step(log_p_x0, t, x, generator=gen).prev_sample
        results.append((x, posteriors))
    assert torch.equal(results[1][0], results[0][0])
    for ours, ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


ADDED = {"TCDScheduler": {}, "DDIMInverseScheduler": {}, "DPMSolverMultistepInverseScheduler": {},
         "EDMDPMSolverMultistepScheduler": {}, "FlowMatchHeunDiscreteScheduler": {"shift": 3.0},
         "FlowMatchLCMScheduler": {"shift": 3.0}, "DDIMParallelScheduler": {}, "DDPMParallelScheduler": {},
         "CMStochasticIterativeScheduler": {}, "SASolverScheduler": {}, "UnCLIPScheduler": {},
         "RePaintScheduler": {}, "VQDiffusionScheduler": {"num_vec_classes": 8}}
NOISED = ["TCDScheduler", "DPMSolverMultistepInverseScheduler", "EDMDPMSolverMultistepScheduler",
          "DDIMParallelScheduler", "DDPMParallelScheduler", "CMStochasticIterativeScheduler", "SASolverScheduler",
          "UnCLIPScheduler"]


@pytest.mark.parametrize("name", NOISED)
def test_add_noise_matches(name):
    ours, ref = (getattr(lib, name)(**ADDED[name]) for lib in (diffusekit, diffusers))
    for scheduler in (ours, ref):
        scheduler.set_timesteps(8)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    t = ref.timesteps[[2, 5]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


def test_repaint_has_no_add_noise():
    with pytest.raises(NotImplementedError, match="DDPMScheduler.add_noise"):
        diffusekit.RePaintScheduler().add_noise(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(ADDED))
def test_config_files_are_read_both_ways(name, tmp_path):
    """Each side reads the other's scheduler_config.json into the same config; compatibles as the reference's."""
    ours = getattr(diffusekit, name)(**ADDED[name])
    ours.save_pretrained(tmp_path / "ours")
    ref = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    public = [k for k in ours.config if not k.startswith("_")]
    assert public and {k: ref.config[k] for k in public} == {k: ours.config[k] for k in public}
    getattr(diffusers, name)(**ADDED[name]).save_pretrained(tmp_path / "ref")
    back = getattr(diffusekit, name).from_pretrained(tmp_path / "ref")
    assert {k: back.config[k] for k in public} == {k: ours.config[k] for k in public}
    ours_compatible = {c.__name__ for c in ours.compatibles}
    ref_compatible = {c.__name__ for c in ref.compatibles} & set(diffusekit._EXPORTS)
    assert ours_compatible == ref_compatible
