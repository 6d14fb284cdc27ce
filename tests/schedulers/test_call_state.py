"""``SchedulerMixin.for_call``: copies whose loops, interleaved, give the results of loops run alone,
and leave the scheduler they were copied from exactly as it was."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import diffusekit

SCHEDULERS = [
    ("DDPMScheduler", {}), ("DDIMScheduler", {}), ("PNDMScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
    ("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}), ("LMSDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", {}),
    ("EDMEulerScheduler", {}), ("LCMScheduler", {}), ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("DPMSolverMultistepScheduler", {}), ("DPMSolverSinglestepScheduler", {}), ("DEISMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {}), ("IPNDMScheduler", {}), ("TCDScheduler", {}), ("DDIMInverseScheduler", {}),
    ("DPMSolverMultistepInverseScheduler", {}), ("EDMDPMSolverMultistepScheduler", {}),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}), ("FlowMatchHeunDiscreteScheduler", {}),
    ("FlowMatchLCMScheduler", {"shift": 3.0}), ("DDIMParallelScheduler", {}), ("DDPMParallelScheduler", {}),
    ("CMStochasticIterativeScheduler", {}), ("SASolverScheduler", {}), ("UnCLIPScheduler", {}),
]


def _unipc_with_solver_p():
    return diffusekit.UniPCMultistepScheduler(solver_p=diffusekit.DPMSolverMultistepScheduler())


def _loop(scheduler, steps: int, seed: int):
    """A generator of one sampling loop on ``scheduler`` (fake model outputs), yielding each sample."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 2, 4, 4, generator=gen)
    options = {"generator": gen} if "generator" in scheduler.step.__code__.co_varnames else {}
    for t in scheduler.timesteps:
        output = torch.randn(1, 2, 4, 4, generator=gen)
        sample = scheduler.step(output, t, scheduler.scale_model_input(sample, t), **options).prev_sample
        yield sample


def _snapshot(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, diffusekit.SchedulerMixin):
        return {k: _snapshot(v) for k, v in vars(value).items()}
    return value


def _same(a, b) -> bool:
    """Exactly equal (NaN equal to NaN: some sigma tables hold log(0) midpoints)."""
    if isinstance(b, diffusekit.SchedulerMixin):
        b = vars(b)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _build(name, config):
    return _unipc_with_solver_p() if name == "solver_p" else getattr(diffusekit, name)(**config)


@pytest.mark.parametrize("name, config", SCHEDULERS + [("solver_p", {})], ids=lambda v: str(v)[:40])
def test_interleaved_loops_on_copies_match_loops_alone(name, config):
    parent = _build(name, config)
    parent.set_timesteps(5)
    list(zip(range(2), _loop(parent, 5, seed=9)))  # the parent is mid-loop: it has step state of its own
    before = _snapshot(vars(parent))
    alone = [list(_loop(_build(name, config).for_call(), steps, seed)) for steps, seed in ((6, 0), (4, 1))]
    loops = [_loop(parent.for_call(), steps, seed) for steps, seed in ((6, 0), (4, 1))]
    together: list[list[torch.Tensor]] = [[], []]
    for samples in itertools.zip_longest(*loops):  # one step of each loop in turn
        for run, sample in zip(together, samples):
            if sample is not None:
                run.append(sample)
    assert [len(samples) for samples in together] == [len(samples) for samples in alone]
    assert all(torch.equal(a, b) for run, ref in zip(together, alone) for a, b in zip(run, ref))
    after = vars(parent)
    assert before.keys() == after.keys()
    assert [k for k in before if not _same(before[k], after[k])] == []


def test_copy_shares_config_and_tables_but_not_history():
    parent = diffusekit.DPMSolverMultistepScheduler()
    copy = parent.for_call()
    assert copy.config is parent.config and copy.alphas_cumprod is parent.alphas_cumprod
    assert copy.model_outputs == parent.model_outputs and copy.model_outputs is not parent.model_outputs
    unipc = _unipc_with_solver_p()
    assert unipc.for_call().solver_p is not unipc.solver_p
