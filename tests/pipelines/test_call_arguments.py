"""Every pipeline checks its call arguments up front: ValueError naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusekit import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    KarrasVePipeline,
    KarrasVeScheduler,
    LDMPipeline,
    PNDMPipeline,
    PNDMScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusekit.pipelines.call_checks import check_call_arguments, check_prompt_text
from sd_components import UNET_CONFIG

IMAGE = torch.rand(1, 3, 32, 32)
MASK = torch.ones(1, 1, 32, 32)


def _sd(parts, cls):
    if cls is StableDiffusionDepth2ImgPipeline:
        unet = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": 5}).eval()
        components = {k: v for k, v in parts.items() if k not in ("safety_checker", "unet")}
        pipe = cls(**components, unet=unet, depth_estimator=None)
    else:
        pipe = cls(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux(cls):
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
               text_encoder_2=None, tokenizer_2=None, transformer=None)


#: (pipeline, the inputs it needs besides the prompt)
TEXT_PIPELINES = {
    "txt2img": (StableDiffusionPipeline, {}),
    "img2img": (StableDiffusionImg2ImgPipeline, {"image": IMAGE}),
    "inpaint": (StableDiffusionInpaintPipeline, {"image": IMAGE, "mask_image": MASK}),
    "depth2img": (StableDiffusionDepth2ImgPipeline, {"image": IMAGE, "depth_map": torch.rand(1, 32, 32)}),
    "flux": (FluxPipeline, {}),
    "flux_img2img": (FluxImg2ImgPipeline, {"image": IMAGE}),
}
STRENGTH_PIPELINES = ("img2img", "inpaint", "depth2img", "flux_img2img")
SIZED_PIPELINES = ("txt2img", "inpaint", "flux", "flux_img2img")

BAD_ARGUMENTS = [
    ("guidance_scale", math.nan), ("guidance_scale", math.inf), ("guidance_scale", -math.inf),
    ("guidance_scale", "7"), ("prompt", []), ("prompt", ["a cat", 3]),
    ("num_images_per_prompt", 0), ("num_images_per_prompt", -1), ("num_images_per_prompt", 1.5),
    ("num_inference_steps", 0), ("num_inference_steps", -1), ("num_inference_steps", 2.5),
    ("num_inference_steps", True),
]


def _pipe(name, parts):
    cls, _ = TEXT_PIPELINES[name]
    return _flux(cls) if name.startswith("flux") else _sd(parts, cls)


def _call(pipe, name, **kwargs):
    defaults = dict(prompt="the cat", num_inference_steps=2, output_type="np", height=32, width=32,
                    generator=torch.Generator().manual_seed(0), **TEXT_PIPELINES[name][1])
    if name not in SIZED_PIPELINES:
        defaults.pop("height"), defaults.pop("width")
    return pipe(**{**defaults, **kwargs})


@pytest.mark.parametrize("name", list(TEXT_PIPELINES))
@pytest.mark.parametrize("argument, value", BAD_ARGUMENTS, ids=lambda v: repr(v)[:20])
def test_bad_argument_is_refused(parts, name, argument, value):
    with pytest.raises(ValueError, match=argument):
        _call(_pipe(name, parts), name, **{argument: value})


@pytest.mark.parametrize("name", STRENGTH_PIPELINES)
@pytest.mark.parametrize("strength", [-0.1, 1.5, math.nan, math.inf])
def test_strength_outside_zero_one_is_refused(parts, name, strength):
    with pytest.raises(ValueError, match="strength"):
        _call(_pipe(name, parts), name, strength=strength)


@pytest.mark.parametrize("name", SIZED_PIPELINES)
@pytest.mark.parametrize("argument, value", [("height", 0), ("width", -16), ("height", 32.0)])
def test_non_positive_size_is_refused(parts, name, argument, value):
    with pytest.raises(ValueError, match=argument):
        _call(_pipe(name, parts), name, **{argument: value})


@pytest.mark.parametrize("name", ["txt2img", "inpaint"])
def test_sd_sizes_must_divide_by_8(parts, name):
    with pytest.raises(ValueError, match="height and width must be divisible by 8"):
        _call(_pipe(name, parts), name, width=36)


def test_valid_call_still_runs(parts):
    images = _call(_pipe("img2img", parts), "img2img", num_images_per_prompt=2, strength=1.0).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("build, kwargs", [
    (lambda: DDPMPipeline(unet=None, scheduler=DDPMScheduler()), {}),
    (lambda: DDIMPipeline(unet=None, scheduler=DDIMScheduler()), {"eta": math.nan}),
    (lambda: PNDMPipeline(unet=None, scheduler=PNDMScheduler()), {}),
    (lambda: LDMPipeline(vqvae=None, unet=None, scheduler=DDIMScheduler()), {}),
    (lambda: ScoreSdeVePipeline(unet=None, scheduler=ScoreSdeVeScheduler()), {}),
    (lambda: KarrasVePipeline(unet=None, scheduler=KarrasVeScheduler()), {}),
])
def test_classic_pipelines_check_steps_and_batch_size(build, kwargs):
    pipe = build()
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            pipe(num_inference_steps=steps)
    for batch_size in (0, -2):
        with pytest.raises(ValueError, match="batch_size"):
            pipe(batch_size=batch_size)
    for name, value in kwargs.items():
        with pytest.raises(ValueError, match=name):
            pipe(**{name: value})


def test_check_helpers_accept_valid_values():
    check_call_arguments(num_inference_steps=np.int64(3), guidance_scale=0, strength=1, num_images_per_prompt=2,
                         eta=0.5, true_cfg_scale=4.0, guidance_rescale=None)
    check_prompt_text("prompt", ["a", "b"])
    with pytest.raises(ValueError, match="negative_prompt is an empty list"):
        check_prompt_text("negative_prompt", [])
