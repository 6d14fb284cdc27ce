"""SDXL pipelines on their own: argument errors, the added conditioning in step callbacks,
force_upcast decoding, A1111 weighting through both text encoders."""

import logging

import numpy as np
import pytest
import torch

from diffusekit import (
    AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusekit.pipelines.vae_codec import decode_latents
from sdxl_pipeline_parts import (
    REFINER_UNET_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoders, tiny_tokenizer,
)


@pytest.fixture(scope="module")
def xl_parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    return dict(vae=AutoencoderKL(**VAE_CONFIG).eval(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**UNET_CONFIG).eval(),
                scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def pipe(xl_parts):
    pipe = StableDiffusionXLPipeline(**xl_parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    kwargs.setdefault("prompt", "the cat")
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=None, prompt_2="a", prompt_embeds=torch.zeros(1, 77, 64),
          pooled_prompt_embeds=torch.zeros(1, 32)), "either prompt_2 or prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 64)), "pooled_prompt_embeds"),
    (dict(negative_prompt_embeds=torch.zeros(1, 77, 64)), "negative_pooled_prompt_embeds"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt holds 1 prompts"),
    (dict(prompt_2=3), "prompt_2 must be a str"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"]),
     "may only name"),
    (dict(height=36), "divisible by 8"),
])
def test_text_to_image_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(pipe, **kwargs)


def test_img2img_errors(xl_parts):
    image = torch.rand(1, 3, 32, 32)
    img2img = StableDiffusionXLImg2ImgPipeline(**xl_parts)
    with pytest.raises(ValueError, match=r"denoising_start \(0.8\) must be smaller than denoising_end \(0.5\)"):
        _run(img2img, image=image, denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(ValueError, match="image is required"):
        _run(img2img)
    with pytest.raises(ValueError, match="strength=0.3 .* leaves 0 of the denoising steps"):
        _run(img2img, image=image)
    # a refiner UNet (5 time ids) in a pipeline that sends 6
    torch.manual_seed(0)
    refiner_unet = UNet2DConditionModel(**REFINER_UNET_CONFIG).eval()
    refiner = StableDiffusionXLImg2ImgPipeline(**{**xl_parts, "unet": refiner_unet, "text_encoder": None,
                                                  "tokenizer": None})
    with pytest.raises(ValueError, match="takes 72 values but .* give 80; .* requires_aesthetics_score=True"):
        _run(refiner, image=image, strength=0.5)
    refiner.register_to_config(requires_aesthetics_score=True)
    assert _run(refiner, image=image, strength=0.5).shape == (1, 32, 32, 3)
    base_as_refiner = StableDiffusionXLImg2ImgPipeline(**xl_parts, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="takes 80 values but .* give 72; .* requires_aesthetics_score=False"):
        _run(base_as_refiner, image=image, strength=0.5)


def test_encode_prompt_shapes_and_zero_negative(pipe):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("the cat", device="cpu",
                                                                      num_images_per_prompt=3)
        unguided = pipe.encode_prompt("the cat", device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (3, 77, 64) and pooled.shape == (3, 32)
    assert torch.equal(negative, torch.zeros_like(embeds)) and torch.equal(negative_pooled, torch.zeros_like(pooled))
    assert unguided[1] is None and unguided[3] is None
    torch.testing.assert_close(unguided[0], embeds[:1], rtol=0, atol=0)


def test_callback_sees_and_replaces_the_added_conditioning(pipe):
    seen = []

    def look(p, i, t, tensors):
        assert p.denoising_end is None and p.num_timesteps == 2
        seen.append({k: v.clone() for k, v in tensors.items()})
        return {}

    def shift(p, i, t, tensors):
        return {"add_time_ids": tensors["add_time_ids"] + 64}

    names = ["latents", "add_text_embeds", "add_time_ids"]
    plain = _run(pipe, num_images_per_prompt=2, height=32, width=48, crops_coords_top_left=(8, 4),
                 callback_on_step_end=look, callback_on_step_end_tensor_inputs=names)
    assert len(seen) == 2 and sorted(seen[0]) == sorted(names)
    assert seen[0]["add_text_embeds"].shape == (4, 32)
    assert seen[0]["add_time_ids"].tolist() == [[32, 48, 8, 4, 32, 48]] * 4
    shifted = _run(pipe, num_images_per_prompt=2, height=32, width=48, crops_coords_top_left=(8, 4),
                   callback_on_step_end=shift, callback_on_step_end_tensor_inputs=["add_time_ids"])
    assert np.abs(shifted - plain).max() > 1e-4
    assert not hasattr(pipe, "added_cond_kwargs") and not hasattr(pipe, "add_time_ids")


def test_force_upcast_decodes_half_vae_in_float32(xl_parts, caplog):
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    vae.load_state_dict(xl_parts["vae"].state_dict())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = decode_latents(vae, latents)
        vae.half()
        assert vae.config.force_upcast is True
        with caplog.at_level(logging.WARNING, logger="diffusekit.pipelines.vae_codec"):
            upcast = decode_latents(vae, latents.half(), force_upcast=True)
        plain = decode_latents(vae, latents.half())
    assert upcast.dtype == torch.float32 and plain.dtype == torch.float16 and vae.dtype == torch.float16
    assert not caplog.records
    torch.testing.assert_close(upcast, reference, atol=5e-3, rtol=0)  # weights rounded to float16


def test_a1111_weighting_through_both_encoders(pipe):
    plain = _run(pipe, negative_prompt="dog")
    np.testing.assert_array_equal(_run(pipe, negative_prompt="dog", prompt_weighting="a1111"), plain)
    weighted = _run(pipe, prompt="(the cat:1.5)", negative_prompt="dog", prompt_weighting="a1111")
    assert np.isfinite(weighted).all() and np.abs(weighted - plain).max() > 1e-4
    long_prompt = "the (cat:1.3) and [dog] " * 30
    out = _run(pipe, prompt=long_prompt, prompt_2="a dog", negative_prompt="the", prompt_weighting="a1111")
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    long_negative = _run(pipe, prompt="a cat", negative_prompt=long_prompt, prompt_weighting="a1111")
    assert np.isfinite(long_negative).all()


def test_readme_sdxl_examples(xl_parts, tmp_path, monkeypatch):
    """The README's SDXL blocks run as written (tiny local folders, CPU, float32, fewer steps)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "StableDiffusionXL" in b]
    assert len(blocks) == 2
    StableDiffusionXLPipeline(**xl_parts).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    refiner = {**xl_parts, "text_encoder": None, "tokenizer": None,
               "unet": UNet2DConditionModel(**REFINER_UNET_CONFIG).eval()}
    StableDiffusionXLImg2ImgPipeline(**refiner, requires_aesthetics_score=True).save_pretrained(tmp_path / "refiner")
    replacements = {'"stabilityai/stable-diffusion-xl-base-1.0"': repr(str(tmp_path / "base")),
                    '"stabilityai/stable-diffusion-xl-refiner-1.0"': repr(str(tmp_path / "refiner")),
                    'torch.float16': 'torch.float32', '.to("cuda")': '', 'num_inference_steps=40': 'num_inference_steps=5'}
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        for old, new in replacements.items():
            block = block.replace(old, new)
        exec(block, scope)
    assert (tmp_path / "astronaut.png").is_file() and scope["latents"].shape == (1, 4, 16, 16)
    assert scope["image"].size == (32, 32) and scope["refiner"].vae is scope["pipe"].vae


def test_threads_keep_their_own_added_conditioning(pipe):
    """Two threads sharing the pipeline, each with its own micro-conditioning, get the images of
    the same calls run alone (the added conditioning lives in each call's state)."""
    import threading

    calls = [dict(crops_coords_top_left=(0, 0), seed=1), dict(crops_coords_top_left=(16, 8), seed=2)]

    def call(options):
        options = dict(options)
        generator = torch.Generator().manual_seed(options.pop("seed"))
        return pipe("the cat", num_inference_steps=3, output_type="np", generator=generator, **options).images

    alone = [call(options) for options in calls]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def worker(index):
        barrier.wait()
        results[index] = call(calls[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.abs(alone[0] - alone[1]).max() > 1e-4
    for got, expected in zip(results, alone):
        np.testing.assert_array_equal(got, expected)
