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
