"""SDXL ControlNet pipelines against the reference, on tiny random parts the reference saves: one
and two ("text_time") ControlNets, guess mode, guidance start/end, scales, image-to-image."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from controlnet_parts import random_controlnet
from sdxl_pipeline_parts import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoders, tiny_tokenizer
from test_sdxl import _close, _run


def _controlnet(seed: int, **changes) -> diffusers.ControlNetModel:
    return random_controlnet(diffusers.ControlNetModel, seed, **changes)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER_CONFIG))


def _pair(parts, tmp_path_factory, name: str, controlnet, **options):
    """(ours, reference): the reference saves the pipeline, ours loads it through model_index.json."""
    folder = tmp_path_factory.mktemp(name)
    getattr(diffusers, name)(**parts, controlnet=controlnet, add_watermarker=False, **options).save_pretrained(folder)
    ours = diffusekit.DiffusionPipeline.from_pretrained(folder)
    assert type(ours).__name__ == name
    ref = getattr(diffusers, name).from_pretrained(folder, add_watermarker=False)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module")
def one_net(parts, tmp_path_factory):
    return _pair(parts, tmp_path_factory, "StableDiffusionXLControlNetPipeline", _controlnet(1))


@pytest.fixture(scope="module")
def two_nets(parts, tmp_path_factory):
    return _pair(parts, tmp_path_factory, "StableDiffusionXLControlNetPipeline", [_controlnet(1), _controlnet(2)])


@pytest.fixture(scope="module")
def img2img(parts, tmp_path_factory):
    return _pair(parts, tmp_path_factory, "StableDiffusionXLControlNetImg2ImgPipeline", _controlnet(1))


@pytest.fixture(scope="module")
def img2img_two(parts, tmp_path_factory):
    return _pair(parts, tmp_path_factory, "StableDiffusionXLControlNetImg2ImgPipeline",
                 [_controlnet(1), _controlnet(3)])


def _image(size=(32, 32), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_the_net_changes_the_image(one_net):
    """The residuals matter: with scale 0 the image differs from scale 1 (else parity proves little)."""
    ours, _ = one_net
    kwargs = dict(prompt="the cat", image=_image())
    plain = _run(ours, **kwargs, controlnet_conditioning_scale=0.0)
    assert np.abs(_run(ours, **kwargs) - plain).max() > 1e-2


@pytest.mark.parametrize("kwargs", [
    dict(prompt="the cat"),
    dict(prompt="the cat", negative_prompt="a dog", controlnet_conditioning_scale=0.5, num_inference_steps=3),
    dict(prompt="the cat", guess_mode=True, guidance_scale=3.0, controlnet_conditioning_scale=0.8),
    dict(prompt="the cat", control_guidance_start=0.25, control_guidance_end=0.75, num_inference_steps=4),
    dict(prompt=["the cat", "a dog"], num_images_per_prompt=2, guidance_scale=1.0),
    dict(prompt="the cat", height=48, width=32, original_size=(64, 48), crops_coords_top_left=(4, 8),
         negative_original_size=(24, 24), negative_target_size=(16, 24)),
    dict(prompt="the cat", num_inference_steps=5, denoising_end=0.6, control_guidance_end=0.5),
], ids=["plain", "negative-scale", "guess-mode", "start-end", "batch-unguided", "sizes", "denoising-end"])
def test_one_net(one_net, kwargs):
    ours, ref = one_net
    kwargs = dict(kwargs, image=_image())
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_one_net_control_batch_and_tensor(one_net):
    """A control image per prompt (repeated per image), and a tensor control image."""
    ours, ref = one_net
    kwargs = dict(prompt=["the cat", "a dog"], image=[_image(seed=1), _image(seed=2)], num_images_per_prompt=2)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))
    tensor = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _close(_run(ours, prompt="the cat", image=tensor), _run(ref, prompt="the cat", image=tensor))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(controlnet_conditioning_scale=[0.5, 1.5], control_guidance_start=[0.0, 0.4],
         control_guidance_end=[0.6, 1.0], num_inference_steps=5),
    dict(guess_mode=True, controlnet_conditioning_scale=[1.0, 0.3]),
    dict(control_guidance_end=[0.5, 1.0], num_inference_steps=4),
], ids=["plain", "scales-start-end", "guess-mode", "end-list"])
def test_two_nets(two_nets, kwargs):
    ours, ref = two_nets
    assert type(ours.controlnet).__name__ == "MultiControlNetModel" and len(ours.controlnet.nets) == 2
    kwargs = dict(kwargs, prompt="the cat", image=[_image(seed=1), _image(seed=2)])
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_prompt_embeds_and_callback(one_net):
    ours, ref = one_net
    with torch.no_grad():
        embeds = ref.encode_prompt("the cat", device="cpu", negative_prompt="dog")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    seen = {}

    def callback(pipe, step, t, tensors):
        seen.setdefault(type(pipe).__module__.split(".")[0], []).append(tensors["image"].shape)
        return tensors

    kwargs = dict(zip(names, embeds), image=_image(), callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["latents", "image"])
    _close(_run(ours, **kwargs), _run(ref, **kwargs))
    assert seen["diffusekit"] == seen["diffusers"] == [(2, 3, 32, 32)] * 2


@pytest.mark.parametrize("kwargs", [
    dict(strength=0.6, num_inference_steps=4),
    dict(strength=0.8, num_inference_steps=4, guess_mode=True, controlnet_conditioning_scale=0.7),
    dict(strength=0.9, num_inference_steps=5, control_guidance_start=0.2, control_guidance_end=0.8,
         negative_prompt="a dog", crops_coords_top_left=(4, 4), negative_original_size=(16, 16)),
    dict(strength=0.7, num_inference_steps=3, height=48, width=32, num_images_per_prompt=2),
], ids=["plain", "guess-mode", "start-end-micro", "resized-batch"])
def test_img2img(img2img, kwargs):
    ours, ref = img2img
    kwargs = dict(kwargs, prompt="the cat", image=_image(seed=5), control_image=_image(seed=6))
    if "height" in kwargs:
        kwargs["image"] = _image((32, 48), seed=5)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_img2img_two_nets(img2img_two):
    ours, ref = img2img_two
    kwargs = dict(prompt="the cat", image=_image(seed=5), control_image=[_image(seed=6), _image(seed=7)],
                  strength=0.8, num_inference_steps=4, controlnet_conditioning_scale=[0.6, 1.1],
                  control_guidance_start=[0.0, 0.5])
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_global_pool_conditions_force_guess_mode(parts, tmp_path_factory):
    ours, ref = _pair(parts, tmp_path_factory, "StableDiffusionXLControlNetPipeline",
                      _controlnet(4, global_pool_conditions=True))
    _close(_run(ours, prompt="the cat", image=_image()), _run(ref, prompt="the cat", image=_image()))


def test_our_save_loads_in_the_reference(one_net, tmp_path):
    ours, _ = one_net
    ours.save_pretrained(tmp_path)
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(tmp_path, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    _close(_run(ours, prompt="the cat", image=_image()), _run(ref, prompt="the cat", image=_image()))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(image=[_image()]), ValueError, "with 2 ControlNets the control image must be a list of 2 images"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5, 0.2]), ValueError,
     "controlnet_conditioning_scale must be a number or a list of 2 numbers"),
    (dict(control_guidance_start=[0.5, 0.2], control_guidance_end=[0.4, 1.0]), ValueError,
     "control_guidance_start 0.5 and control_guidance_end 0.4 must satisfy"),
    (dict(callback_on_step_end_tensor_inputs=["control_image"]), ValueError, "may only name"),
], ids=["image-count", "scale-count", "window", "callback-name"])
def test_argument_errors(two_nets, kwargs, error, message):
    ours, _ = two_nets
    kwargs = {"prompt": "the cat", "image": [_image(), _image()], **kwargs}
    with pytest.raises(error, match=message):
        _run(ours, **kwargs)


def test_img2img_needs_both_images(img2img):
    ours, _ = img2img
    with pytest.raises(ValueError, match="image is required"):
        _run(ours, prompt="the cat", control_image=_image())
    with pytest.raises(ValueError, match="a control image is required"):
        _run(ours, prompt="the cat", image=_image())


def test_threads_sharing_a_pipeline_get_the_images_of_solo_calls(two_nets):
    """Per-call state: overlapping calls with their own scales, windows and guess mode."""
    import threading

    ours, _ = two_nets
    options = [dict(prompt="the cat", controlnet_conditioning_scale=[0.5, 1.0]),
               dict(prompt="a dog", guess_mode=True, control_guidance_end=[0.5, 1.0], num_inference_steps=3),
               dict(prompt="the cat and dog", controlnet_conditioning_scale=[1.5, 0.2], guidance_scale=2.0)]
    images = [_image(seed=1), _image(seed=2)]
    alone = [_run(ours, seed=i, image=images, output_type="pt", **o) for i, o in enumerate(options)]
    together, barrier = {}, threading.Barrier(len(options))

    def work(i: int) -> None:
        barrier.wait()
        together[i] = _run(ours, seed=i, image=images, output_type="pt", **options[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(options))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(torch.equal(alone[i], together[i]) for i in range(len(options)))
    assert not torch.equal(alone[0], alone[2])
