"""The sampler-name table: every name resolves to an exported scheduler class with config keys it takes."""

from __future__ import annotations

import pytest

import diffusekit
from diffusekit.configuration import init_parameters
from diffusekit.schedulers.names import SAMPLER_NAMES, scheduler_from_name

SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1}
EXPECTED = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
            "dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras", "unipc", "ddim", "ddpm", "pndm",
            "lms", "lms_karras", "heun", "deis", "lcm", "dpmpp_2s_a"]


def test_table_covers_the_common_names():
    assert set(EXPECTED) <= set(SAMPLER_NAMES)


@pytest.mark.parametrize("name", sorted(SAMPLER_NAMES))
def test_entry_names_an_exported_class_and_its_config_keys(name):
    entry = SAMPLER_NAMES[name]
    assert entry.class_name in diffusekit._EXPORTS
    assert entry.description and "\n" not in entry.description
    cls = getattr(diffusekit, entry.class_name)
    assert set(entry.overrides) <= set(init_parameters(cls)), entry.overrides


@pytest.mark.parametrize("name", ["euler", "euler_a", "lms_karras", "heun", "dpm2_a_karras", "ddim", "ddpm", "pndm",
                                  "lcm"])
def test_builds_from_an_existing_config(name):
    scheduler = scheduler_from_name(name, SD_CONFIG)
    entry = SAMPLER_NAMES[name]
    assert type(scheduler).__name__ == entry.class_name
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012
    for key, value in entry.overrides.items():
        assert scheduler.config[key] == value
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_names_are_normalised():
    assert type(scheduler_from_name("DPM2 Karras", SD_CONFIG)).__name__ == "KDPM2DiscreteScheduler"
    assert scheduler_from_name("Euler-A", SD_CONFIG).config.beta_schedule == "scaled_linear"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scheduler name 'nope'.*dpmpp_2m_karras.*euler_a"):
        scheduler_from_name("nope", SD_CONFIG)
