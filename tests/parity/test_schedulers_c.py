"""Parity of the schedulers added for drop-in use (TCD, inverse DDIM / DPM-Solver, EDM DPM-Solver, flow
Heun / LCM, parallel DDIM / DDPM, ...) with diffusers 0.42.1: full sampling loops per config option,
with the loop and fake model of test_schedulers_a."""

from __future__ import annotations

import pytest

from test_schedulers_a import BETAS, PRED3, SPACING, cases, check_parity, variants

BETAS3 = {**BETAS, "beta_schedule": ["linear", "squaredcos_cap_v2"]}  # TCD refuses the others
LCM_LIKE = {**BETAS3, **PRED3, "set_alpha_to_one": [False], "original_inference_steps": [25],
            "timestep_scaling": [5.0], "rescale_betas_zero_snr": [True], "clip_sample": [True], "thresholding": [True]}

PARITY = [
    *cases("TCDScheduler", variants({}, LCM_LIKE), [1, 4, 10]),
    *[p for eta in (0.0, 0.3, 1.0) for p in cases("TCDScheduler", [{}], [4, 8], None, {"eta": eta})],
    *cases("TCDScheduler", [{}], [4], {"strength": 0.5}),
    *cases("TCDScheduler", [{}], [4], {"original_inference_steps": 100}),
    *cases("TCDScheduler", [{}], [None], {"timesteps": [999, 759, 499, 259]}),
    *cases("DDIMInverseScheduler", variants({}, {**BETAS3, **PRED3, **SPACING, "clip_sample": [False],
                                                 "clip_sample_range": [0.5], "set_alpha_to_one": [False],
                                                 "rescale_betas_zero_snr": [True]}), [1, 4, 10]),
]


@pytest.mark.parametrize("name, config, steps, set_kwargs, step_kwargs", PARITY)
def test_sampling_loop_matches_reference(name, config, steps, set_kwargs, step_kwargs):
    check_parity(name, config, steps, set_kwargs, step_kwargs)
