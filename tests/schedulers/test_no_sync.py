"""The step path makes no host syncs after the first step: the sample, model output and timestep
are tensors that refuse to be read back (.item(), bool(), float(), int(), tolist(), nonzero)."""

from __future__ import annotations

import inspect

import pytest
import torch

import diffusekit
from helpers import guarded, plain

SCHEDULERS = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"variance_type": "learned_range", "thresholding": True}, {}),
    ("DDIMScheduler", {"thresholding": True}, {"eta": 0.5}),
    ("PNDMScheduler", {}, {}),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"s_churn": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {"clip_sample": True}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("EDMEulerScheduler", {}, {"s_churn": 1.0}),
    ("LCMScheduler", {"thresholding": True}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True, "invert_sigmas": True}, {}),
]


@pytest.mark.parametrize("name, config, step_kwargs", SCHEDULERS, ids=lambda v: str(v)[:40])
def test_steps_do_not_read_tensors_back(name, config, step_kwargs):
    scheduler = getattr(diffusekit, name)(**config)
    scheduler.set_timesteps(6)
    learned = config.get("variance_type") == "learned_range"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        if i > 0:  # the first step may look its timestep up once
            x, t = guarded(x), guarded(t)
        out = torch.cos(scheduler.scale_model_input(x, t))
        if learned:
            out = torch.cat([out, torch.tanh(out)], dim=1)
        kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **kwargs, **step_kwargs).prev_sample
    assert torch.isfinite(plain(x)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, config, step_kwargs", SCHEDULERS, ids=lambda v: str(v)[:40])
def test_cuda_steps_do_not_sync(name, config, step_kwargs):
    scheduler = getattr(diffusekit, name)(**config)
    scheduler.set_timesteps(6, device="cuda")
    x = torch.randn(1, 2, 4, 4, device="cuda")
    learned = config.get("variance_type") == "learned_range"
    for i, t in enumerate(scheduler.timesteps):
        torch.cuda.set_sync_debug_mode("error" if i > 0 else "default")
        try:
            out = torch.cos(scheduler.scale_model_input(x, t))
            if learned:
                out = torch.cat([out, torch.tanh(out)], dim=1)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert x.shape == (1, 2, 4, 4)


def test_guard_catches_host_reads():
    x = guarded(torch.ones(2))
    for read in (lambda: x[0].item(), lambda: bool(x[0] > 0), lambda: float(x[0]),
                 lambda: int(x[0]), lambda: x.tolist()):
        with pytest.raises(RuntimeError, match="host sync"):
            read()
    assert torch.isfinite(plain(x)).all()
