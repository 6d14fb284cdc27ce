"""StableDiffusion(Img2Img)Pipeline behaviour beyond parity: argument errors, the float16 VAE
fallback, prompt weighting and callbacks, on tiny diffusekit parts."""

import logging

import numpy as np
import pytest
import torch

from diffusekit import AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusekit.pipelines.vae_codec import decode_latents
from sd_components import VAE_CONFIG


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    defaults = dict(prompt="the cat", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0))
    return pipe(**{**defaults, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=33), "divisible by 8"),
    (dict(prompt=["the cat", "a dog"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"]),
     "callback_on_step_end_tensor_inputs"),
    (dict(num_images_per_prompt=2, generator=[torch.Generator()] * 3), "generator"),
    (dict(prompt=None), "prompt"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), "prompt"),
    (dict(prompt_weighting="compel"), "prompt_weighting"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(sigmas=[3.0, 1.0]), "sigmas"),
    (dict(timesteps=[900, 500], sigmas=[3.0, 1.0]), "timesteps or sigmas"),
])
def test_text_to_image_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(pipe, **kwargs)


def test_image_to_image_errors_and_strength(parts):
    pipe = StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            _run(pipe, image=image, strength=strength)
    with pytest.raises(ValueError, match="generator"):
        _run(pipe, image=image, generator=[torch.Generator()] * 2)
    steps = []
    _run(pipe, image=image, strength=0.5, num_inference_steps=4,
         callback_on_step_end=lambda p, i, t, kw: steps.append(int(t)) or {})
    schedule = pipe.scheduler.for_call()  # a call leaves pipe.scheduler as it was: see the schedule it ran
    schedule.set_timesteps(4)
    assert steps == [int(t) for t in schedule.timesteps[2:]]
    assert pipe.scheduler.num_inference_steps is None


def test_safety_checker_arguments(parts, caplog):
    with caplog.at_level(logging.WARNING):
        StableDiffusionPipeline(**parts)
    assert any("safety checker" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="feature_extractor"):
        StableDiffusionPipeline(**{**parts, "safety_checker": torch.nn.Linear(1, 1)})


def test_prompt_weighting_and_callback_interrupt(pipe):
    long_prompt = "the (cat:1.4) and [dog] " * 30
    out = _run(pipe, prompt=long_prompt, negative_prompt="dog", prompt_weighting="a1111")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    plain = _run(pipe, prompt="the cat").images
    np.testing.assert_array_equal(_run(pipe, prompt="the cat", prompt_weighting="a1111").images, plain)

    calls = []

    def stop(p, i, t, tensors):
        calls.append(i)
        p._interrupt = True
        return {}

    latents = _run(pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=stop).images
    assert calls == [0] and latents.shape == (1, 4, 16, 16)


def test_a1111_weighting_gives_finite_images_with_effect(pipe):
    plain = _run(pipe, prompt="the cat").images
    same = _run(pipe, prompt="(the cat:1.0)", prompt_weighting="a1111").images
    weighted = _run(pipe, prompt="(the cat:1.5)", prompt_weighting="a1111").images
    assert np.isfinite(weighted).all() and np.isfinite(same).all()
    np.testing.assert_array_equal(same, plain)
    assert np.abs(weighted - plain).max() > 1e-4


def _overflowing_vae() -> AutoencoderKL:
    """A float16 VAE whose decoder input layer overflows (activations ~1e6 > 65504)."""
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(1e5)
    return vae


def test_fp16_vae_overflow_falls_back_to_float32(pipe, parts, caplog):
    vae = _overflowing_vae()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae.decode(latents / vae.config.scaling_factor).sample
        assert torch.isfinite(reference).all()
        vae.half()
        assert not torch.isfinite(vae.decode((latents / vae.config.scaling_factor).half()).sample).all()
        with caplog.at_level(logging.WARNING, logger="diffusekit.pipelines.vae_codec"):
            image = decode_latents(vae, latents.half())
    warnings = [r for r in caplog.records if r.name == "diffusekit.pipelines.vae_codec"]
    assert len(warnings) == 1 and "float16" in warnings[0].message
    assert vae.dtype == torch.float16
    torch.testing.assert_close(image, reference, atol=2e-3, rtol=0)

    caplog.clear()
    fp16_pipe = StableDiffusionPipeline(**{**parts, "vae": vae}, requires_safety_checker=False)
    fp16_pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="diffusekit.pipelines.vae_codec"):
        images = _run(fp16_pipe).images
    assert np.isfinite(images).all() and images.std() > 0
    assert len([r for r in caplog.records if r.name == "diffusekit.pipelines.vae_codec"]) == 1
