"""Parity of the inpainting and depth-to-image pipelines (and their mask/crop helpers) with the
reference: tiny components built and saved by diffusers/transformers, loaded by diffusekit,
float32 on the CPU, same seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import DDIMScheduler as RefDDIMScheduler
from diffusers import EulerDiscreteScheduler as RefEulerScheduler
from diffusers import StableDiffusionDepth2ImgPipeline as RefDepth2Img
from diffusers import StableDiffusionInpaintPipeline as RefInpaint
from diffusers import UNet2DConditionModel as RefUNet
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from diffusekit.pipelines.image_processing import (
    mask_crop_region, overlay_inpainted, preprocess_images, preprocess_mask, resize_pil,
)
from diffusekit.pipelines.stable_diffusion_depth2img import StableDiffusionDepth2ImgPipeline
from diffusekit.pipelines.stable_diffusion_inpaint import StableDiffusionInpaintPipeline

TOL = dict(atol=1e-4, rtol=0)
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")  # the reference DPT call on the CPU


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


def _image(height=32, width=32, seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def _mask(height=32, width=32, box=(8, 4, 24, 20)) -> Image.Image:
    values = np.zeros((height, width), dtype="uint8")
    x1, y1, x2, y2 = box
    values[y1:y2, x1:x2] = 255
    return Image.fromarray(values)


def _unet(in_channels):
    return _seeded(lambda: RefUNet(**dict(UNET_CONFIG, in_channels=in_channels)), seed=in_channels)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    depth = DPTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=32, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=[8, 8, 16, 16],
                      fusion_hidden_size=8)
    return dict(
        tokenizer=tokenizer, text_encoder=tiny_text_encoder(tokenizer),
        vae=_seeded(lambda: RefAutoencoderKL(**VAE_CONFIG)),
        ddim=RefDDIMScheduler.from_config(SCHEDULER_CONFIG), euler=RefEulerScheduler.from_config(SCHEDULER_CONFIG),
        depth_estimator=_seeded(lambda: DPTForDepthEstimation(depth)),
        feature_extractor=DPTImageProcessor(size={"height": 32, "width": 32}),
    )


def _pair(ref, ours_cls, folder):
    """The reference pipeline saved to ``folder`` and loaded back by diffusekit."""
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(folder)
    ours = ours_cls.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def _inpaint_pair(parts, folder, in_channels, scheduler):
    ref = RefInpaint(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                     unet=_unet(in_channels), scheduler=parts[scheduler], safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)
    return _pair(ref, StableDiffusionInpaintPipeline, folder)


@pytest.fixture(scope="module")
def inpaint9(parts, tmp_path_factory):
    return _inpaint_pair(parts, tmp_path_factory.mktemp("inpaint9"), 9, "ddim")


@pytest.fixture(scope="module")
def depth(parts, tmp_path_factory):
    ref = RefDepth2Img(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                       unet=_unet(5), scheduler=parts["ddim"], depth_estimator=parts["depth_estimator"],
                       feature_extractor=parts["feature_extractor"])
    return _pair(ref, StableDiffusionDepth2ImgPipeline, tmp_path_factory.mktemp("depth"))


def _both(pair, **kwargs):
    """Run the reference and ours with the same arguments and seed; returns (ref, ours) outputs."""
    outputs = []
    for pipe in pair:
        generator = kwargs.pop("generators", None)
        seeds = generator or [0]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        outputs.append(pipe(generator=gens if generator else gens[0], **kwargs).images)
        if generator:
            kwargs["generators"] = generator
    return outputs


# -- pipelines --------------------------------------------------------------------------------------

def test_inpaint_9_channel_unet_with_guidance(inpaint9):
    ref, ours = _both(inpaint9, prompt="a cat", image=_image(), mask_image=_mask(), num_inference_steps=2,
                      guidance_scale=6.0, output_type="np")
    assert ours.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(ours, ref, **TOL)


def test_inpaint_4_channel_unet_blends_latents(parts, tmp_path):
    pair = _inpaint_pair(parts, tmp_path, 4, "euler")
    image = np.random.RandomState(1).rand(32, 32, 3).astype(np.float32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:20, 10:30] = 1.0
    ref, ours = _both(pair, prompt="the dog", image=image, mask_image=mask, num_inference_steps=3, strength=0.7,
                      guidance_scale=1.0, num_images_per_prompt=2, generators=[0, 1], output_type="np")
    assert ours.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(ours, ref, **TOL)


def test_inpaint_padding_mask_crop_pastes_into_original(inpaint9):
    image, mask = _image(40, 48, seed=2), _mask(40, 48, box=(30, 10, 38, 16))
    ref, ours = _both(inpaint9, prompt="a cat", image=image, mask_image=mask, padding_mask_crop=2, height=32,
                      width=32, num_inference_steps=2, guidance_scale=1.0)
    assert ours[0].size == (48, 40)
    diff = np.abs(np.asarray(ours[0], dtype=int) - np.asarray(ref[0], dtype=int))
    assert diff.max() <= 1
    kept = np.asarray(mask) == 0  # outside the mask the original pixels come back
    assert np.array_equal(np.asarray(ours[0])[kept], np.asarray(image)[kept])


def test_depth2img_with_depth_estimator(depth):
    ref, ours = _both(depth, prompt="a cat", image=_image(seed=3), num_inference_steps=3, strength=0.7,
                      guidance_scale=5.0, output_type="np")
    assert ours.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(ours, ref, **TOL)


def test_depth2img_with_given_depth_map(depth):
    image = torch.from_numpy(np.random.RandomState(4).rand(1, 3, 32, 32).astype(np.float32))
    depth_map = torch.from_numpy(np.random.RandomState(5).rand(1, 20, 24).astype(np.float32))
    ref, ours = _both(depth, prompt=["a dog"], image=image, depth_map=depth_map, num_inference_steps=2, strength=1.0,
                      guidance_scale=1.0, output_type="np")
    np.testing.assert_allclose(ours, ref, **TOL)
    ours_pipe = depth[1]
    depth_mask = ours_pipe.prepare_depth_map(image, depth_map, 2, True, torch.float32, torch.device("cpu"))
    assert depth_mask.shape == (4, 1, 16, 16)
    assert depth_mask.amin().item() == pytest.approx(-1.0) and depth_mask.amax().item() == pytest.approx(1.0)


def test_argument_errors(inpaint9, depth):
    inpaint, depth_pipe = inpaint9[1], depth[1]
    with pytest.raises(ValueError, match="mask_image"):
        inpaint("a cat", image=_image(), mask_image=_mask(16, 16))
    with pytest.raises(ValueError, match="mask_image"):
        inpaint("a cat", image=torch.rand(1, 3, 32, 32), mask_image=np.zeros((32, 24)))
    for mask in (np.zeros((1, 32, 32)), np.zeros((32, 32, 1)), torch.zeros(32, 32), [_mask(), _mask()]):
        inpaint.check_inpaint_inputs(_image(), mask, 1.0, None, "pil")  # same size in other layouts: no error
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            inpaint("a cat", image=_image(), mask_image=_mask(), strength=strength)
        with pytest.raises(ValueError, match="strength"):
            depth_pipe("a cat", image=_image(), strength=strength)
    with pytest.raises(ValueError, match="padding_mask_crop"):
        inpaint("a cat", image=_image(), mask_image=_mask(), padding_mask_crop=2, output_type="np")
    with pytest.raises(ValueError, match="depth_map"):
        depth_pipe("a cat", image=_image(), depth_map=torch.rand(1, 1, 8, 8))


# -- mask and crop helpers against the reference's image processor ---------------------------------

MASK_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                   do_convert_grayscale=True)


def _mask_inputs():
    values = (np.random.RandomState(6).rand(37, 45) * 255).astype("uint8")
    pil, array = Image.fromarray(values), values / 255.0
    return [
        (pil, {}), (pil, dict(height=24, width=40)), ([pil, pil], dict(height=16, width=16)),
        (array, {}), (array[..., None], dict(height=16, width=24)), (np.stack([array, array]), {}),
        ([array, array], {}), (torch.from_numpy(array), {}), (torch.from_numpy(array)[None], dict(height=8, width=8)),
        (torch.rand(2, 1, 37, 45, generator=torch.Generator().manual_seed(0)), {}),
        (pil, dict(height=32, width=32, resize_mode="fill", crops_coords=(3, 2, 30, 33))),
    ]


@pytest.mark.parametrize("index", range(len(_mask_inputs())))
def test_preprocess_mask_matches_reference(index):
    mask, kwargs = _mask_inputs()[index]
    expected = MASK_PROCESSOR.preprocess(mask, **kwargs)
    got = preprocess_mask(mask, vae_scale_factor=8, **kwargs)
    assert got.shape == expected.shape and set(got.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(got.double(), expected.double(), atol=0, rtol=0)


def test_crop_region_resize_modes_and_overlay_match_reference():
    mask = _mask(40, 64, box=(30, 10, 35, 20))
    for pad in (0, 2, 20):
        for width, height in ((32, 32), (64, 16), (16, 64)):
            expected = MASK_PROCESSOR.get_crop_region(mask, width, height, pad)
            assert mask_crop_region(mask, width, height, pad) == expected
    image = _image(40, 64, seed=7)
    for source in (image, image.resize((30, 64)), mask):
        for mode in ("fill", "crop"):
            for width, height in ((32, 32), (48, 16), (16, 40)):
                expected = MASK_PROCESSOR.resize(source, height, width, resize_mode=mode)
                assert np.array_equal(np.asarray(resize_pil(source, width, height, mode)), np.asarray(expected))
    crop = mask_crop_region(mask, 64, 40, pad=3)
    inpainted = _image(24, 20, seed=8)
    expected = MASK_PROCESSOR.apply_overlay(mask, image, inpainted, crop)
    assert np.array_equal(np.asarray(overlay_inpainted(mask, image, inpainted, crop)), np.asarray(expected))
    image_processor = VaeImageProcessor(vae_scale_factor=8)
    expected = image_processor.preprocess(image, 32, 32, resize_mode="fill", crops_coords=crop)
    torch.testing.assert_close(preprocess_images(image, 32, 32, resize_mode="fill", crops_coords=crop), expected)
