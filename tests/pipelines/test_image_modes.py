"""Image inputs in any PIL mode (RGBA, L, P, 16-bit) and numpy/tensor layouts: converted to RGB
as the reference converts them (masks to L), output size = input size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from diffusekit.pipelines.image_processing import convert_pil, preprocess_images, preprocess_mask
from sd_components import UNET_CONFIG

HEIGHT, WIDTH = 24, 40


def _rgba(height: int = HEIGHT, width: int = WIDTH) -> Image.Image:
    values = np.random.RandomState(0).randint(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(values, mode="RGBA")


def _sixteen_bit(gray: Image.Image) -> Image.Image:
    image = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert image.mode.startswith("I;16")
    return image


def _variants(image: Image.Image) -> dict[str, Image.Image]:
    """The same picture in several modes, and the RGB image each one should be read as."""
    gray = image.convert("L")
    palette = image.convert("RGB").quantize(64)
    return {"RGBA": (image, image.convert("RGB")), "L": (gray, gray.convert("RGB")),
            "P": (palette, palette.convert("RGB")), "I;16": (_sixteen_bit(gray), gray.convert("RGB"))}


@pytest.fixture(scope="module")
def pipes(parts):
    built = {
        "img2img": StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False),
        "inpaint": StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False),
        "depth2img": StableDiffusionDepth2ImgPipeline(
            **{k: v for k, v in parts.items() if k not in ("safety_checker", "unet")}, depth_estimator=None,
            unet=UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": 5}).eval()),
    }
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def _run(pipe, name: str, image, **kwargs) -> np.ndarray:
    extra = {"img2img": {}, "depth2img": {"depth_map": torch.linspace(0, 1, HEIGHT * WIDTH).view(1, HEIGHT, WIDTH)},
             "inpaint": {"mask_image": Image.new("L", (WIDTH, HEIGHT), 255), "height": HEIGHT, "width": WIDTH}}[name]
    out = pipe(prompt="the cat", image=image, num_inference_steps=2, strength=0.5, output_type="np",
               generator=torch.Generator().manual_seed(0), **{**extra, **kwargs})
    return out.images


@pytest.mark.parametrize("name", ["img2img", "inpaint", "depth2img"])
@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_pil_modes_give_the_image_of_their_rgb_conversion(pipes, name, mode):
    image, as_rgb = _variants(_rgba())[mode]
    got = _run(pipes[name], name, image)
    assert got.shape == (1, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(got, _run(pipes[name], name, as_rgb))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "1", "I;16"])
def test_mask_modes_read_as_grayscale(pipes, mode):
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (8, 4, 32, 20))
    variant = _sixteen_bit(mask) if mode == "I;16" else mask.convert(mode)
    got = _run(pipes["inpaint"], "inpaint", _rgba().convert("RGB"), mask_image=variant)
    assert got.shape == (1, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(got, _run(pipes["inpaint"], "inpaint", _rgba().convert("RGB"), mask_image=mask))


def test_sixteen_bit_values_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    image = Image.fromarray(ramp)
    converted = np.asarray(convert_pil(image, "L"), dtype=np.float64)
    np.testing.assert_allclose(converted, ramp / 257.0, atol=0.5)
    assert np.asarray(convert_pil(image, "RGB")).shape == (16, 16, 3)
    mask = preprocess_mask(Image.fromarray(np.full((16, 16), 20000, dtype=np.uint16)), vae_scale_factor=8)
    assert mask.max() == 0  # 20000 / 65535 < 0.5: kept (PIL's clip to 255 would repaint it)


def test_arrays_and_tensors():
    rgb = np.random.RandomState(1).rand(16, 16, 3).astype(np.float32)
    with pytest.raises(ValueError, match="image has 4 channels"):
        preprocess_images(np.concatenate([rgb, rgb[..., :1]], axis=-1))
    with pytest.raises(ValueError, match="image has 2 channels"):
        preprocess_images(torch.rand(1, 2, 16, 16))
    gray = rgb[..., 0]
    torch.testing.assert_close(preprocess_images(gray), preprocess_images(np.repeat(gray[..., None], 3, axis=-1)))
    as_uint16 = np.round(rgb * 65535).astype(np.uint16)
    torch.testing.assert_close(preprocess_images(as_uint16), preprocess_images((as_uint16 / 65535.0).astype(np.float32)))
    latents = torch.rand(1, 4, 8, 8)
    assert torch.equal(preprocess_images(latents, latent_channels=4), latents)
    with pytest.raises(ValueError, match="or 16 for latents"):
        preprocess_images(latents, latent_channels=16)
