"""Argument checks of the schedulers added for drop-in use (where the reference only asserts)."""

from __future__ import annotations

import pytest
import torch

import diffusekit


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_tcd_eta_outside_unit_interval_refused(eta):
    scheduler = diffusekit.TCDScheduler()
    scheduler.set_timesteps(4)
    sample = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        scheduler.step(sample, scheduler.timesteps[0], sample, eta=eta)


@pytest.mark.parametrize("algorithm_type", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_inverse_dpm_third_order_sde_refused(algorithm_type):
    with pytest.raises(ValueError, match="solver_order=3 is not available"):
        diffusekit.DPMSolverMultistepInverseScheduler(algorithm_type=algorithm_type, solver_order=3)


def test_inverse_dpm_timesteps_ascend_without_repeats():
    scheduler = diffusekit.DPMSolverMultistepInverseScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(30)
    steps = scheduler.timesteps.tolist()
    assert steps == sorted(set(steps)) and scheduler.num_inference_steps == len(steps)
    with pytest.raises(ValueError, match="num_inference_steps is required"):
        scheduler.set_timesteps()


def test_ddim_parallel_batch_step_refuses_noise():
    scheduler = diffusekit.DDIMParallelScheduler()
    scheduler.set_timesteps(4)
    sample = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="eta must be 0"):
        scheduler.batch_step_no_noise(sample, scheduler.timesteps[:2], sample, eta=0.5)


def test_sa_solver_learned_variance_steps_with_sample_shaped_noise():
    scheduler = diffusekit.SASolverScheduler(variance_type="learned_range")
    scheduler.set_timesteps(3)
    sample = torch.ones(1, 2, 4, 4)
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.cat([sample * 0.1, sample], dim=1), t, sample,
                                generator=torch.Generator().manual_seed(0)).prev_sample
    assert sample.shape == (1, 2, 4, 4) and torch.isfinite(sample).all()


@pytest.mark.parametrize("config, key", [({"predictor_order": 5}, "predictor_order"),
                                         ({"corrector_order": 0}, "corrector_order"),
                                         ({"algorithm_type": "x"}, "algorithm_type"),
                                         ({"algorithm_type": "noise_prediction", "thresholding": True}, "thresholding")])
def test_sa_solver_bad_config_refused(config, key):
    with pytest.raises(ValueError, match=key):
        diffusekit.SASolverScheduler(**config)


def test_unclip_needs_two_steps():
    with pytest.raises(ValueError, match="num_inference_steps >= 2"):
        diffusekit.UnCLIPScheduler().set_timesteps(1)
