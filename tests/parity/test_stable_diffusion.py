"""Stable Diffusion text-to-image and image-to-image against the reference, on tiny random parts
the reference saves (UNet, VAE, CLIP text encoder, tokenizer, safety checker)."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from sd_components import (
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    tiny_feature_extractor,
    tiny_safety_config,
    tiny_text_encoder,
    tiny_tokenizer,
)

TOL = 1e-4
SCHEDULERS = ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


def _reference_parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    return dict(vae=vae, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                scheduler=diffusers.PNDMScheduler.from_config(SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A reference StableDiffusionPipeline without safety checker, saved."""
    folder = tmp_path_factory.mktemp("sd")
    parts = _reference_parts(tmp_path_factory)
    diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return folder


def _load(lib, name, folder, **kwargs):
    pipe = getattr(lib, name).from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(sd_folder):
    name = "StableDiffusionPipeline"
    return _load(diffusekit, name, sd_folder), _load(diffusers, name, sd_folder)


def _run(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


def _close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image_schedulers(pipes, scheduler):
    ours, ref = pipes
    ours.scheduler = getattr(diffusekit, scheduler).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    out, expected = _run(ours, prompt="the cat"), _run(ref, prompt="the cat")
    assert out.images.shape == (1, 32, 32, 3) and out.nsfw_content_detected is None
    _close(out.images, expected.images)


def test_negative_prompt_batch_rescale_eta(pipes):
    ours, ref = pipes
    ours.scheduler = diffusekit.DDIMScheduler.from_config(ours.scheduler.config)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    kwargs = dict(prompt=["the cat", "a dog"], negative_prompt=["dog", "the"], num_images_per_prompt=2,
                  guidance_rescale=0.7, eta=0.5, guidance_scale=6.0, height=24, width=40)
    out = _run(ours, **kwargs).images
    assert out.shape == (4, 24, 40, 3)
    _close(out, _run(ref, **kwargs).images)


def test_generator_list_latents_and_output_types(pipes):
    ours, ref = pipes
    ours.scheduler = diffusekit.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    kwargs = dict(prompt="the cat", num_images_per_prompt=2, num_inference_steps=2)
    _close(ours(generator=gens(), output_type="np", **kwargs).images,
           ref(generator=gens(), output_type="np", **kwargs).images)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    for output_type in ("pt", "latent"):
        a = ours(prompt="a dog", latents=latents, output_type=output_type, num_inference_steps=2).images
        b = ref(prompt="a dog", latents=latents, output_type=output_type, num_inference_steps=2).images
        _close(a, b)
    pil = _run(ours, prompt="a dog", output_type="pil").images
    assert isinstance(pil[0], Image.Image)
    expected = _run(ref, prompt="a dog", output_type="pil").images[0]
    np.testing.assert_array_equal(np.asarray(pil[0]), np.asarray(expected))


def test_custom_sigmas_clip_skip_embeds_and_callback(pipes):
    ours, ref = pipes
    ours.scheduler = diffusekit.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    sigmas = [14.0, 3.0, 0.5]
    _close(_run(ours, prompt="a cat", sigmas=sigmas).images, _run(ref, prompt="a cat", sigmas=sigmas).images)
    steps = [999, 600, 250]
    _close(_run(ours, prompt="a cat", timesteps=steps).images, _run(ref, prompt="a cat", timesteps=steps).images)
    # the reference reads ``text_encoder.text_model``, which transformers 5 no longer has
    object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
    _close(_run(ours, prompt="a cat", clip_skip=1).images, _run(ref, prompt="a cat", clip_skip=1).images)
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5))
    _close(_run(ours, prompt_embeds=embeds, negative_prompt_embeds=-embeds).images,
           _run(ref, prompt_embeds=embeds, negative_prompt_embeds=-embeds).images)

    seen = {}

    def halve(pipe, step, t, tensors):
        seen.setdefault(id(pipe), []).append((step, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5}

    names = ["latents", "prompt_embeds"]
    a = _run(ours, prompt="a cat", callback_on_step_end=halve, callback_on_step_end_tensor_inputs=names).images
    b = _run(ref, prompt="a cat", callback_on_step_end=halve, callback_on_step_end_tensor_inputs=names).images
    _close(a, b)
    assert seen[id(ours)] == seen[id(ref)] == [(0, names), (1, names)]


@pytest.mark.parametrize("kind", ["pil", "np", "pt"])
def test_image_to_image(sd_folder, kind):
    ours = _load(diffusekit, "StableDiffusionImg2ImgPipeline", sd_folder)
    ref = _load(diffusers, "StableDiffusionImg2ImgPipeline", sd_folder)
    for pipe, lib in ((ours, diffusekit), (ref, diffusers)):
        pipe.scheduler = lib.DDIMScheduler.from_config(pipe.scheduler.config)
    pixels = np.random.default_rng(0).random((33, 41, 3), dtype=np.float32)  # cut to a multiple of the VAE factor (2)
    image = {"pil": Image.fromarray((pixels * 255).astype(np.uint8)), "np": pixels[None],
             "pt": torch.from_numpy(pixels).permute(2, 0, 1)[None]}[kind]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)] if kind == "pt" else None
    kwargs = dict(prompt="the cat", image=image, strength=0.6, num_inference_steps=4, num_images_per_prompt=2,
                  negative_prompt="dog", output_type="np")
    a = ours(generator=gens or torch.Generator().manual_seed(0), **kwargs).images
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)] if kind == "pt" else None
    b = ref(generator=gens or torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (2, 32, 40, 3)
    _close(a, b)


@pytest.fixture(scope="module")
def safety_folder(tmp_path_factory, sd_folder):
    """A reference pipeline with a tiny safety checker set to flag the first of two known images."""
    ref = _load(diffusers, "StableDiffusionPipeline", sd_folder)
    images = _run(ref, prompt=["the cat", "a dog"], output_type="pil").images
    feature_extractor = tiny_feature_extractor()
    torch.manual_seed(0)
    checker = diffusers.pipelines.stable_diffusion.StableDiffusionSafetyChecker(tiny_safety_config()).eval()
    with torch.no_grad():
        pixels = feature_extractor(images, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        direction = embeds[0] - embeds[1]  # closer to image 0 than to image 1
        cos = torch.nn.functional.cosine_similarity(embeds, direction[None], dim=1)
        assert cos[0] - cos[1] > 0.01
        checker.concept_embeds[0] = direction
        checker.concept_embeds_weights.fill_(2.0)
        checker.concept_embeds_weights[0] = cos.mean()  # image 0 scores above its threshold, image 1 below
        checker.special_care_embeds_weights.fill_(2.0)
    folder = tmp_path_factory.mktemp("sd_safety")
    diffusers.StableDiffusionPipeline(**{**ref.components, "safety_checker": checker,
                                         "feature_extractor": feature_extractor}).save_pretrained(folder)
    return folder


def test_safety_checker_flags_and_blacks_out(safety_folder):
    ours = _load(diffusekit, "StableDiffusionPipeline", safety_folder)
    ref = _load(diffusers, "StableDiffusionPipeline", safety_folder)
    assert isinstance(ours.safety_checker, diffusekit.StableDiffusionSafetyChecker)
    a, b = _run(ours, prompt=["the cat", "a dog"]), _run(ref, prompt=["the cat", "a dog"])
    assert a.nsfw_content_detected == b.nsfw_content_detected == [True, False]
    assert not a.images[0].any() and a.images[1].any()
    _close(a.images, b.images)


def test_save_then_reference_loads(pipes, tmp_path, safety_folder):
    ours = _load(diffusekit, "StableDiffusionPipeline", safety_folder)
    ours.save_pretrained(tmp_path)
    ref = _load(diffusers, "StableDiffusionPipeline", tmp_path)
    assert type(ref.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    _close(_run(ours, prompt="a cat").images, _run(ref, prompt="a cat").images)


def test_legacy_scheduler_config_is_fixed(pipes):
    """steps_offset=0 and clip_sample=True (old SD configs) are rewritten on construction, as the reference does."""
    legacy = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours, ref = (lib.StableDiffusionPipeline(**{**pipe.components, "scheduler": lib.DDIMScheduler(**legacy)})
                 for lib, pipe in ((diffusekit, pipes[0]), (diffusers, pipes[1])))
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.clip_sample is False
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    _close(_run(ours, prompt="a cat").images, _run(ref, prompt="a cat").images)
