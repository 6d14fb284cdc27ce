"""Stable Diffusion XL pipelines against the reference, on tiny random parts the reference saves
(two CLIP text encoders, a text_time UNet, a refiner UNet with the aesthetic score, inpainting UNets)."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from sdxl_pipeline_parts import (
    REFINER_UNET_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoders, tiny_tokenizer,
)

TOL = 1e-4
SCHEDULERS = ["EulerDiscreteScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler"]


def _unet(seed=0, **changes):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**UNET_CONFIG, **changes})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=_unet(), scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER_CONFIG))


def _save(tmp_path_factory, name, cls, **parts):
    folder = tmp_path_factory.mktemp(name)
    getattr(diffusers, cls)(**parts, add_watermarker=False).save_pretrained(folder)
    return folder


def _pair(folder, name):
    """(ours, reference) loaded from the same folder; ours through DiffusionPipeline (model_index.json)."""
    ours = diffusekit.DiffusionPipeline.from_pretrained(folder)
    assert type(ours).__name__ == name
    ref = getattr(diffusers, name).from_pretrained(folder, add_watermarker=False)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module")
def base_folder(parts, tmp_path_factory):
    return _save(tmp_path_factory, "base", "StableDiffusionXLPipeline", **parts)


@pytest.fixture(scope="module")
def base(base_folder):
    return _pair(base_folder, "StableDiffusionXLPipeline")


@pytest.fixture(scope="module")
def refiner(parts, tmp_path_factory):
    refiner_parts = dict(parts, text_encoder=None, tokenizer=None, unet=_unet(1, **REFINER_UNET_CONFIG))
    folder = tmp_path_factory.mktemp("refiner")
    diffusers.StableDiffusionXLImg2ImgPipeline(**refiner_parts, requires_aesthetics_score=True,
                                               add_watermarker=False).save_pretrained(folder)
    return _pair(folder, "StableDiffusionXLImg2ImgPipeline")


@pytest.fixture(scope="module")
def img2img(parts, tmp_path_factory):
    return _pair(_save(tmp_path_factory, "img2img", "StableDiffusionXLImg2ImgPipeline", **parts),
                 "StableDiffusionXLImg2ImgPipeline")


@pytest.fixture(scope="module", params=[9, 4])
def inpaint(request, parts, tmp_path_factory):
    unet = _unet(2, in_channels=request.param) if request.param == 9 else parts["unet"]
    folder = _save(tmp_path_factory, f"inpaint{request.param}", "StableDiffusionXLInpaintPipeline",
                   **dict(parts, unet=unet))
    return _pair(folder, "StableDiffusionXLInpaintPipeline")


def _run(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def _close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()


def _image(size=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(size=32):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image_schedulers(base, scheduler):
    ours, ref = base
    ours.scheduler = getattr(diffusekit, scheduler).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    out = _run(ours, prompt="the cat")
    assert out.shape == (1, 32, 32, 3)
    _close(out, _run(ref, prompt="the cat"))


@pytest.mark.parametrize("kwargs", [
    dict(prompt="the cat", negative_prompt="a dog", prompt_2="and the dog", negative_prompt_2="cat"),
    dict(prompt=["the cat", "a dog"], num_images_per_prompt=2, height=32, width=48, guidance_rescale=0.7),
    dict(prompt="the cat", original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(40, 40),
         negative_original_size=(24, 24), negative_crops_coords_top_left=(2, 2), negative_target_size=(16, 24),
         num_images_per_prompt=2),
    dict(prompt="the cat", clip_skip=1, guidance_scale=1.0),
    dict(prompt=["the cat", "a dog"], negative_prompt="the", height=48, width=32),
], ids=["negative-prompt-2", "batch-rescale-nonsquare", "micro-conditioning", "clip-skip-unguided", "negative-str"])
def test_text_to_image_options(base, kwargs):
    ours, ref = base
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_force_zeros_off_and_prompt_embeds(base, parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nozeros")
    diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=False,
                                        add_watermarker=False).save_pretrained(folder)
    ours, ref = _pair(folder, "StableDiffusionXLPipeline")
    assert ours.config.force_zeros_for_empty_prompt is False
    _close(_run(ours, prompt="the cat"), _run(ref, prompt="the cat"))
    with torch.no_grad():
        embeds = ref.encode_prompt("the cat", device="cpu", negative_prompt="dog")
        mine = ours.encode_prompt("the cat", device="cpu", negative_prompt="dog")
    for a, b in zip(mine, embeds):
        _close(a, b, 1e-6)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    given = dict(zip(names, embeds))
    _close(_run(base[0], **given), _run(base[1], **given))


def test_refiner_aesthetic_score(refiner):
    ours, ref = refiner
    assert ours.text_encoder is None and ours.config.requires_aesthetics_score is True
    kwargs = dict(prompt="the cat", prompt_2="ignored without the first encoder", negative_prompt="a dog",
                  image=_image(), strength=0.6, num_inference_steps=4, aesthetic_score=7.5,
                  negative_aesthetic_score=1.5, negative_original_size=(16, 16), num_images_per_prompt=2)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_img2img_with_both_encoders(img2img):
    ours, ref = img2img
    kwargs = dict(prompt="the cat", prompt_2="dog", image=_image(), strength=0.8, num_inference_steps=4,
                  negative_prompt="the", crops_coords_top_left=(4, 4))
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_base_to_refiner_hand_off(base, refiner):
    handed = []
    for base_pipe, refiner_pipe in zip(base, refiner):
        latents = _run(base_pipe, prompt="the cat", num_inference_steps=5, denoising_end=0.8, output_type="latent")
        assert latents.shape == (1, 4, 16, 16)
        handed.append(latents)
        handed.append(_run(refiner_pipe, seed=1, prompt="the cat", image=latents, num_inference_steps=5,
                           denoising_start=0.8))
    _close(handed[0], handed[2])
    _close(handed[1], handed[3])


def test_inpaint(inpaint):
    ours, ref = inpaint
    kwargs = dict(prompt="the cat", image=_image(), mask_image=_mask(), num_inference_steps=3, strength=0.8,
                  num_images_per_prompt=2)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_inpaint_refiner_hand_off(inpaint):
    ours, ref = inpaint
    if ours.unet.config.in_channels == 9:
        pytest.skip("the hand-off continues 4-channel latents")
    outputs = []
    for pipe in (ours, ref):
        latents = _run(pipe, prompt="the cat", image=_image(), mask_image=_mask(), num_inference_steps=5,
                       denoising_end=0.6, output_type="latent")
        outputs.append(_run(pipe, seed=2, prompt="the cat", image=latents, mask_image=_mask(), num_inference_steps=5,
                            denoising_start=0.6))
    _close(*outputs)


def test_vae_latents_mean_and_std(parts, tmp_path_factory):
    """A VAE config with latents_mean / latents_std: decoding and img2img encoding normalise with them."""
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(2.0, 0.5, 1.5, 1.0))
    for name in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"):
        ours, ref = _pair(_save(tmp_path_factory, "stats", name, **dict(parts, vae=vae)), name)
        assert ours.vae.config.latents_mean == [0.1, -0.2, 0.3, 0.0]
        kwargs = dict(prompt="the cat")
        if name != "StableDiffusionXLPipeline":
            kwargs.update(image=_image(), strength=0.7, num_inference_steps=4)
        if name == "StableDiffusionXLInpaintPipeline":
            kwargs.update(mask_image=_mask())
        _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_our_save_loads_in_the_reference(base_folder, tmp_path):
    ours = diffusekit.StableDiffusionXLPipeline.from_pretrained(base_folder)
    ours.set_progress_bar_config(disable=True)
    ours.save_pretrained(tmp_path)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    assert ref.config.force_zeros_for_empty_prompt is True
    _close(_run(ours, prompt="the cat"), _run(ref, prompt="the cat"))
