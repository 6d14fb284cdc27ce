"""Scheduler behaviour that diffusers' own tests rely on: PNDM's public PRK/PLMS steps, steps at a timestep
outside the schedule, DDPM's variance lookup by timestep and unknown variance types, tensor previous
timesteps, and the config a fresh scheduler records."""

import logging

import pytest
import torch

from diffusekit import (DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                        EDMDPMSolverMultistepScheduler, LCMScheduler, PNDMScheduler)
from diffusekit.configuration import REFERENCE_VERSION


def _model(sample: torch.Tensor, t) -> torch.Tensor:
    return 0.1 * sample * (float(t) / 1000 + 0.5)


def test_pndm_public_prk_and_plms_steps_equal_step():
    sample = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    looped, direct = PNDMScheduler(), PNDMScheduler()
    looped.set_timesteps(10)
    direct.set_timesteps(10)
    x_loop = x_direct = sample
    for t in looped.timesteps:
        x_loop = looped.step(_model(x_loop, t), t, x_loop).prev_sample
    for t in direct.prk_timesteps:
        x_direct = direct.step_prk(_model(x_direct, t), t, x_direct).prev_sample
    for t in direct.plms_timesteps:
        x_direct = direct.step_plms(_model(x_direct, t), t, x_direct, return_dict=False)[0]
    assert len(direct.prk_timesteps) == 12 and torch.equal(x_direct, x_loop)


def test_pndm_plms_before_the_warm_up_and_steps_before_set_timesteps_refused():
    scheduler = PNDMScheduler()
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step_prk(torch.zeros(1), 1, torch.zeros(1))
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="at least 12 PRK warm-up steps"):
        scheduler.step_plms(torch.zeros(1), scheduler.plms_timesteps[0], torch.zeros(1))


def test_ddim_steps_from_a_timestep_outside_the_schedule_as_given():
    sample = torch.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    off, on = DDIMScheduler(), DDIMScheduler(steps_offset=1)
    off.set_timesteps(10)
    on.set_timesteps(10)  # 901, 801, ..., 1: holds 1, same stride as 900, ..., 0
    assert 1 not in off.timesteps and 1 in on.timesteps
    expected = on.step(_model(sample, 1), torch.tensor(1), sample).prev_sample
    assert torch.equal(off.step(_model(sample, 1), 1, sample).prev_sample, expected)
    assert off.step_index is None  # nothing to move along: the next step looks its timestep up again
    out = off.step(_model(sample, 900), 900, sample)
    assert off.step_index == 1 and out.prev_sample.shape == sample.shape


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler])
def test_dpm_solver_family_maps_a_timestep_outside_the_schedule_to_the_last_step(cls):
    scheduler = cls()
    scheduler.set_timesteps(5)
    last = len(scheduler.timesteps) - 1
    assert scheduler.index_for_timestep(0.123) == last
    sample = torch.ones(1, 2, 2, 2)
    scheduler.step(_model(sample, 0), 0.123, sample)
    assert scheduler.step_index == last + 1  # stepped as the last step


def test_index_for_timestep_refuses_a_timestep_outside_the_schedule_elsewhere():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not in this scheduler's timesteps"):
        scheduler.index_for_timestep(5)


def test_ddpm_variance_is_looked_up_by_timestep():
    scheduler = DDPMScheduler()
    assert scheduler._get_variance(0).item() == pytest.approx(1e-20)
    assert scheduler._get_variance(487).item() == pytest.approx(0.00979, abs=1e-5)
    assert scheduler._get_variance(999).item() == pytest.approx(0.02, abs=1e-5)


def test_ddpm_unknown_variance_type_warns_and_steps_as_fixed_small(caplog):
    sample = torch.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    with caplog.at_level(logging.WARNING, logger="diffusekit"):
        other = DDPMScheduler(variance_type="other")
    assert "variance_type 'other' is not one of fixed_small" in caplog.text
    fixed = DDPMScheduler()
    for scheduler in (other, fixed):
        scheduler.set_timesteps(4)
    results = [s.step(_model(sample, 750), 750, sample, generator=torch.manual_seed(3)).prev_sample
               for s in (other, fixed)]
    assert torch.equal(*results)


@pytest.mark.parametrize("cls", [DDPMScheduler, LCMScheduler])
def test_previous_timestep_is_a_tensor_for_a_tensor_timestep(cls):
    scheduler = cls()
    scheduler.set_timesteps(timesteps=[100, 87, 50, 1, 0]) if cls is DDPMScheduler else scheduler.set_timesteps(4)
    first, second = scheduler.timesteps[:2]
    previous = scheduler.previous_timestep(first)
    assert isinstance(previous, torch.Tensor) and previous.item() == second.item()
    assert scheduler.previous_timestep(int(first)) == int(second)
    assert scheduler.previous_timestep(scheduler.timesteps[-1]).item() == -1


def test_fresh_config_records_class_and_version_and_survives_a_save(tmp_path):
    scheduler = DDIMScheduler(num_train_timesteps=50)
    assert scheduler.config["_class_name"] == "DDIMScheduler"
    assert scheduler.config["_diffusers_version"] == REFERENCE_VERSION
    scheduler.save_pretrained(tmp_path)
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    fresh = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    assert fresh == dict(loaded.config)


def test_ddim_inverse_accepts_and_ignores_ddim_options():
    plain = DDIMInverseScheduler()
    with_options = DDIMInverseScheduler(thresholding=True, sample_max_value=0.5)
    for scheduler in (plain, with_options):
        scheduler.set_timesteps(5)
    sample = torch.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    t = plain.timesteps[1]
    assert torch.equal(plain.step(_model(sample, t), t, sample).prev_sample,
                       with_options.step(_model(sample, t), t, sample).prev_sample)
