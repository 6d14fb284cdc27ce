"""pipe.compile(whole_step=True): a denoising step (input scaling, UNet, guidance, scheduler update) is one
graph with no break, equal to eager, compiled once per scheduler class (no recompile across calls, step
counts, guidance scales or swaps back); eager fallbacks; LoRA call scales of a compiled hotswap model.
Compiles use the fast "eager"/"aot_eager" backends on the tiny SD pipeline."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from diffusekit import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
from diffusekit.pipelines.whole_step import check_whole_step
from lora_files import lora_tensors, peft_layout
from test_compile import _flux_pipe, _sample, fresh_dynamo, pipe  # noqa: F401 (fixtures)


def test_whole_step_is_one_graph_per_scheduler_class_and_matches_eager(pipe):
    ddim = pipe.scheduler
    euler = EulerDiscreteScheduler.from_config(ddim.config)
    eager = {"ddim": _sample(pipe), "ddim3": _sample(pipe, num_inference_steps=3, guidance_scale=5.0)}
    pipe.scheduler = euler
    eager["euler"] = _sample(pipe)
    pipe.scheduler = ddim
    counter = CompileCounterWithBackend("eager")
    assert pipe.compile(whole_step=True, backend=counter, fullgraph=False) is pipe.unet
    torch.testing.assert_close(_sample(pipe), eager["ddim"], atol=1e-4, rtol=0)
    assert counter.frame_count == 1  # fullgraph=False: a graph break would show as a second graph
    torch.testing.assert_close(_sample(pipe, num_inference_steps=3, guidance_scale=5.0), eager["ddim3"],
                               atol=1e-4, rtol=0)
    assert counter.frame_count == 1  # other step count and guidance scale: same graph
    pipe.scheduler = euler
    torch.testing.assert_close(_sample(pipe), eager["euler"], atol=1e-4, rtol=0)
    assert counter.frame_count == 2  # Euler's update is other code: compiled once
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.scheduler = DDIMScheduler.from_config(ddim.config)  # a fresh scheduler of a known class
        torch.testing.assert_close(_sample(pipe), eager["ddim"], atol=1e-4, rtol=0)
        pipe.scheduler = euler
        torch.testing.assert_close(_sample(pipe), eager["euler"], atol=1e-4, rtol=0)
    assert counter.frame_count == 2


def test_flux_whole_step_is_one_graph_and_matches_eager(tmp_path):
    pipe = _flux_pipe(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    options = {"max_sequence_length": 16}
    eager = {steps: _sample(pipe, num_inference_steps=steps, **options) for steps in (2, 3)}
    counter = CompileCounterWithBackend("eager")
    pipe.compile(whole_step=True, backend=counter, fullgraph=False)
    torch.testing.assert_close(_sample(pipe, **options), eager[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(_sample(pipe, num_inference_steps=3, **options), eager[3], atol=1e-4, rtol=0)
    assert counter.frame_count == 1


def test_unsupported_calls_step_eagerly_with_a_warning(pipe, caplog):
    eager = _sample(pipe, eta=0.5)
    counter = CompileCounterWithBackend("eager")
    pipe.compile(whole_step=True, backend=counter)
    with caplog.at_level(logging.WARNING, logger="diffusekit.pipelines.whole_step"):
        assert torch.equal(_sample(pipe, eta=0.5), eager)
    assert "runs its steps eagerly: DDIMScheduler (with these step options) has no step plan" in caplog.text
    assert counter.frame_count == 0
    pipe.load_lora_weights(peft_layout(lora_tensors(pipe, seed=1)), adapter_name="a")
    scaled = _sample(pipe, cross_attention_kwargs={"scale": 0.5})  # not prepared for hotswap: eager steps
    assert "a LoRA call scale (0.5) needs enable_lora_hotswap before compile()" in caplog.text
    pipe.compile(backend="eager")  # back to a compiled denoiser: the whole step is dropped
    assert not hasattr(pipe, "_diffusekit_whole_step")
    assert counter.frame_count == 0 and scaled.shape == (1, 4, 16, 16)


def test_whole_step_needs_a_pipeline_whose_loop_has_it():
    with pytest.raises(ValueError, match="SimpleNamespace has no whole-step loop; use pipe.compile"):
        check_whole_step(SimpleNamespace(), {})
    with pytest.raises(ValueError, match="either mode or options"):
        check_whole_step(SimpleNamespace(), {"mode": "reduce-overhead", "options": {}})


def _lora(pipe, seed: int) -> dict:
    return peft_layout(lora_tensors(pipe, seed=seed, rank=2))


@pytest.mark.parametrize("whole_step", [False, True], ids=["regional", "whole-step"])
def test_lora_call_scale_of_a_compiled_hotswap_model(pipe, whole_step):
    pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x")
    eager = {s: _sample(pipe, cross_attention_kwargs={"scale": s}) for s in (0.5, 0.25, 1.0)}
    pipe.unload_lora_weights()
    pipe.enable_lora_hotswap(target_rank=2)
    pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x")
    counter = CompileCounterWithBackend("aot_eager")
    pipe.compile(whole_step=whole_step, backend=counter)  # regional when not whole-step
    torch.testing.assert_close(_sample(pipe, cross_attention_kwargs={"scale": 0.5}), eager[0.5], atol=1e-4, rtol=0)
    compiled = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(_sample(pipe, cross_attention_kwargs={"scale": 0.25}), eager[0.25],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(_sample(pipe), eager[1.0], atol=1e-4, rtol=0)  # no scale: 1.0 again
        results = []
        threads = [threading.Thread(target=lambda s=s: results.append((s, _sample(
            pipe, cross_attention_kwargs={"scale": s})))) for s in (0.5, 1.0) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert counter.frame_count == compiled and len(results) == 4
    for scale, out in results:
        torch.testing.assert_close(out, eager[scale], atol=1e-4, rtol=0)


def _step_inputs(shape=(1, 4, 8, 8)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("scheduler", [
    DDIMScheduler(beta_schedule="scaled_linear", clip_sample=True, prediction_type="v_prediction"),
    DDIMScheduler(thresholding=True, clip_sample=False),
    EulerDiscreteScheduler(beta_schedule="scaled_linear"),
    EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True),
    FlowMatchEulerDiscreteScheduler(shift=3.0),
], ids=["ddim-v-clip", "ddim-threshold", "euler", "euler-v-karras", "flow"])
def test_step_plans_equal_the_eager_steps(scheduler):
    """The plan's functions are the ones ``step`` calls: equal results, step by step, for a whole schedule."""
    scheduler.set_timesteps(4)
    plan, eager, planned = scheduler.step_plan(), scheduler.for_call(), scheduler.for_call()
    sample, output = _step_inputs()
    planned_sample = sample
    for t in scheduler.timesteps:
        model_input = eager.scale_model_input(sample, t)
        sample = eager.step(output * model_input.std(), t, sample, return_dict=False)[0]
        row = plan.coefficients[planned.plan_position(t)]
        model_input = plan.scale_input(planned_sample, row)
        planned_sample = plan.update(output * model_input.std(), planned_sample, row, plan.constants)
        planned.plan_advance()
        assert torch.equal(planned_sample, sample)


def test_schedulers_without_a_plan():
    ddim, flow = DDIMScheduler(), FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    lcm = FlowMatchLCMScheduler()
    for scheduler in (ddim, flow, lcm):
        scheduler.set_timesteps(2)
    assert ddim.step_plan(eta=0.5) is None and ddim.step_plan(eta=0.0) is not None
    assert flow.step_plan() is None and lcm.step_plan() is None  # stochastic; a subclass stepping otherwise
