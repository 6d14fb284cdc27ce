"""The solver / SDE schedulers' step path reads nothing back to the host after the first step: the
sample, model output and timestep are tensors that refuse .item(), bool(), float(), int(), tolist()."""

from __future__ import annotations

import inspect

import pytest
import torch

import diffusekit
from helpers import NoReadTensor, guarded, plain

SHAPE = (2, 3, 4, 4)

SOLVERS = [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "solver_type": "heun", "thresholding": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range", "use_lu_lambdas": True}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "solver_type": "heun"}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DEISMultistepScheduler", {"solver_order": 3, "thresholding": True}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("IPNDMScheduler", {}),
]


@pytest.mark.parametrize("name, config", SOLVERS, ids=lambda v: str(v)[:60])
def test_solver_steps_do_not_read_back(name, config):
    scheduler = getattr(diffusekit, name)(**config)
    scheduler.set_timesteps(7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    learned = config.get("variance_type") == "learned_range"
    for i, t in enumerate(scheduler.timesteps):
        if i > 0:  # the first step may look its timestep up once
            x, t = guarded(x), guarded(t)
        out = torch.cos(scheduler.scale_model_input(x, t))
        if learned:
            out = torch.cat([out, torch.tanh(out)], dim=1)
        kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    assert isinstance(x, NoReadTensor)
    assert torch.isfinite(plain(x)).all()


def test_score_sde_ve_steps_do_not_read_back():
    scheduler = diffusekit.ScoreSdeVeScheduler(sigma_max=50.0)
    scheduler.set_timesteps(5)
    scheduler.set_sigmas(5)
    gen = torch.Generator().manual_seed(0)
    x = guarded(torch.randn(SHAPE, generator=gen))
    for i, t in enumerate(scheduler.timesteps):
        t, sigma = guarded(t), guarded(scheduler.sigmas[i])
        x = scheduler.step_correct(-x / (sigma**2 + 1), x, generator=gen).prev_sample
        out = scheduler.step_pred(-x / (sigma**2 + 1), t, x, generator=gen)
        x = out.prev_sample
    assert torch.isfinite(plain(out.prev_sample_mean)).all()


def test_score_sde_vp_steps_do_not_read_back():
    scheduler = diffusekit.ScoreSdeVpScheduler()
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x = guarded(torch.randn(SHAPE, generator=gen))
    for t in scheduler.timesteps:
        x, x_mean = scheduler.step_pred(torch.tanh(x), x, guarded(t) * torch.ones(SHAPE[0]), generator=gen)
    assert torch.isfinite(plain(x_mean)).all()


def test_karras_ve_steps_do_not_read_back():
    scheduler = diffusekit.KarrasVeScheduler(sigma_max=20.0)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x = guarded(torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma)
    for i in range(scheduler.num_inference_steps - 1, 0, -1):  # schedule positions, not read from timesteps
        sigma, sigma_prev = guarded(scheduler.schedule[i]), guarded(scheduler.schedule[i - 1])
        sample_hat, sigma_hat = scheduler.add_noise_to_input(x, sigma, generator=gen)
        step = scheduler.step(-torch.tanh(sample_hat), sigma_hat, sigma_prev, sample_hat)
        step = scheduler.step_correct(-torch.tanh(step.prev_sample), sigma_hat, sigma_prev, sample_hat,
                                      step.prev_sample, step.derivative)
        x = step.prev_sample
    assert isinstance(x, NoReadTensor)
    assert torch.isfinite(plain(x)).all()
