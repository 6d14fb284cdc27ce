"""VaeImageProcessor: the pipelines' image and mask preparation as an object (pipe.image_processor)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.image_processor import VaeImageProcessor, mask_image_processor
from diffusekit.pipelines.image_processing import preprocess_images, preprocess_mask


def _image(height: int = 10, width: int = 12) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8))


def test_preprocess_rounds_to_the_scale_factor_and_normalises():
    processor = VaeImageProcessor(vae_scale_factor=4)
    batch = processor.preprocess(_image())
    assert batch.shape == (1, 3, 8, 12) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1 and batch.min() < 0
    assert torch.equal(batch, preprocess_images(_image(), multiple=4))
    plain = VaeImageProcessor(vae_scale_factor=4, do_normalize=False).preprocess(_image(), height=4, width=8)
    assert plain.shape == (1, 3, 4, 8) and plain.min() >= 0


def test_preprocess_without_resize_keeps_the_size():
    batch = VaeImageProcessor(vae_scale_factor=8, do_resize=False).preprocess(_image(10, 12), height=32, width=32)
    assert batch.shape == (1, 3, 10, 12)


def test_latents_pass_through_unchanged():
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(VaeImageProcessor().preprocess(latents), latents)


def test_mask_processor_is_binary_grayscale_not_normalised():
    mask = Image.new("L", (12, 10), 0)
    mask.paste(200, (0, 0, 6, 10))
    batch = mask_image_processor(2).preprocess(mask)
    assert batch.shape == (1, 1, 10, 12) and set(batch.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(batch, preprocess_mask(mask, vae_scale_factor=2))
    soft = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_convert_grayscale=True).preprocess(
        torch.full((1, 1, 4, 4), 0.25))
    assert torch.equal(soft, torch.full((1, 1, 4, 4), 0.25))


def test_postprocess_output_types_and_per_image_denormalize():
    processor = VaeImageProcessor()
    decoded = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(2, 3, 2, 3).clone()
    assert processor.postprocess(decoded, "latent") is decoded
    pt = processor.postprocess(decoded, "pt")
    assert torch.allclose(pt[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert processor.postprocess(decoded, "np").shape == (2, 2, 3, 3)
    pil = processor.postprocess(decoded)
    assert [p.getpixel((2, 0)) for p in pil] == [(255, 255, 255)] * 2
    mixed = processor.postprocess(decoded, "pt", do_denormalize=[True, False])
    assert torch.equal(mixed[1], decoded[1]) and torch.allclose(mixed[0], pt[0])


def test_conversions_round_trip():
    array = VaeImageProcessor.pil_to_numpy([_image(), _image()])
    assert array.shape == (2, 10, 12, 3) and array.dtype == np.float32
    tensor = VaeImageProcessor.numpy_to_pt(array)
    assert tensor.shape == (2, 3, 10, 12)
    assert np.array_equal(VaeImageProcessor.pt_to_numpy(tensor), array)
    assert np.array_equal(np.asarray(VaeImageProcessor.numpy_to_pil(array)[0]), np.asarray(_image()))
    assert VaeImageProcessor.pil_to_numpy(Image.new("L", (3, 2))).shape == (1, 2, 3, 1)
    assert torch.allclose(VaeImageProcessor.denormalize(VaeImageProcessor.normalize(tensor)), tensor, atol=1e-6)
    assert VaeImageProcessor().get_default_height_width(_image(10, 12)) == (8, 8)
    assert VaeImageProcessor(vae_scale_factor=4).get_default_height_width(tensor, height=7) == (4, 12)


def test_config_round_trip_and_errors():
    processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False)
    again = VaeImageProcessor.from_config(processor.config)
    assert again.config.vae_scale_factor == 16 and again.config.do_normalize is False
    with pytest.raises(ValueError, match="do_convert_rgb and do_convert_grayscale"):
        VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True)
    with pytest.raises(ValueError, match="resample='bilinear'"):
        VaeImageProcessor(resample="bilinear")
    with pytest.raises(ValueError, match="takes a torch tensor"):
        VaeImageProcessor().postprocess(np.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match="output_type must be one of"):
        VaeImageProcessor().postprocess(torch.zeros(1, 3, 2, 2), "jpeg")
