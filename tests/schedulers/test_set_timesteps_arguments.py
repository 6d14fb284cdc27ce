"""set_timesteps checks its arguments once, in SchedulerMixin, for every exported scheduler."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import diffusekit
from diffusekit.schedulers.scheduling_utils import SchedulerMixin

SCHEDULER_NAMES = sorted(
    name for name, module in diffusekit._EXPORTS.items()
    if module.startswith("schedulers.") and name.endswith("Scheduler") and name != "SchedulerMixin"
)


#: constructor arguments without defaults
REQUIRED = {"VQDiffusionScheduler": {"num_vec_classes": 8}}
#: schedulers that take one step count only (the reference's too)
FIXED_STEPS = {"ConsistencyDecoderScheduler": 2}


def _build(name: str) -> SchedulerMixin:
    return getattr(diffusekit, name)(**REQUIRED.get(name, {}))


def test_every_scheduler_is_covered():
    assert len(SCHEDULER_NAMES) >= 17
    assert all(issubclass(getattr(diffusekit, n), SchedulerMixin) for n in SCHEDULER_NAMES)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "10"])
def test_bad_num_inference_steps(name, steps):
    scheduler = _build(name)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        scheduler.set_timesteps(steps)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(num_inference_steps=steps)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_valid_steps_still_work(name):
    scheduler = _build(name)
    steps = FIXED_STEPS.get(name, 4)
    scheduler.set_timesteps(np.int64(steps))
    assert len(scheduler.timesteps) >= steps


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler", "DDIMInverseScheduler",
                                  "DDIMParallelScheduler", "DDPMParallelScheduler"])
def test_more_steps_than_training_refused_where_the_reference_refuses(name):
    scheduler = _build(name)
    with pytest.raises(ValueError, match=r"num_inference_steps \(1001\) cannot be larger than num_train_timesteps"):
        scheduler.set_timesteps(1001)


def _custom(name: str, kind: str) -> bool:
    return kind in inspect.signature(getattr(diffusekit, name).set_timesteps).parameters


@pytest.mark.parametrize("kind", ["timesteps", "sigmas"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_custom_schedule_must_be_non_empty_and_finite(name, kind):
    if not _custom(name, kind):
        pytest.skip(f"{name}.set_timesteps takes no {kind}")
    scheduler = _build(name)
    with pytest.raises(ValueError, match=f"{kind} must be a non-empty"):
        scheduler.set_timesteps(**{kind: []})
    with pytest.raises(ValueError, match=f"{kind} must be finite"):
        scheduler.set_timesteps(**{kind: [900.0, math.nan, 0.0]})
    with pytest.raises(ValueError, match=f"{kind} must be finite"):
        scheduler.set_timesteps(**{kind: [math.inf, 1.0]})
    with pytest.raises(ValueError, match=f"{kind} must be a list of numbers"):
        scheduler.set_timesteps(**{kind: ["a", "b"]})
