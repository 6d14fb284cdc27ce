"""Pipelines step their own scheduler copies: ``pipe.scheduler`` stays the user's object, and a
hand-written loop on it (before, between or during pipeline calls) matches the reference's."""

from __future__ import annotations

import threading

import diffusers
import pytest
import torch

import diffusekit
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer
from test_schedulers_a import sample_loop


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    return dict(vae=diffusekit.AutoencoderKL(**VAE_CONFIG).eval(), text_encoder=tiny_text_encoder(tokenizer),
                tokenizer=tokenizer, unet=diffusekit.UNet2DConditionModel(**UNET_CONFIG).eval(),
                safety_checker=None, feature_extractor=None)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_hand_loop_on_pipe_scheduler_matches_reference_around_pipeline_calls(parts, name):
    pipe = diffusekit.StableDiffusionPipeline(
        **parts, scheduler=getattr(diffusekit, name).from_config(SCHEDULER_CONFIG), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = sample_loop(getattr(diffusers, name).from_config(SCHEDULER_CONFIG), 5)
    call = threading.Thread(target=lambda: pipe("the cat", num_inference_steps=3, output_type="latent",
                                                generator=torch.Generator().manual_seed(0)))
    call.start()  # a pipeline call running while the hand loop runs
    during = sample_loop(pipe.scheduler, 5)
    call.join()
    pipe("a dog", num_inference_steps=2, output_type="latent")
    assert pipe.scheduler.num_inference_steps == 5  # the last hand loop's schedule, untouched by the calls
    after = sample_loop(pipe.scheduler, 5)
    for got in (during, after):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
