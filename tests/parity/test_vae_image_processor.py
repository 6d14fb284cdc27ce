"""VaeImageProcessor against the reference's: same tensors from preprocess, same outputs from postprocess."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor as RefProcessor
from PIL import Image

from diffusekit.image_processor import VaeImageProcessor

IMAGE_OPTIONS = dict(vae_scale_factor=4)
MASK_OPTIONS = dict(vae_scale_factor=4, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def _pil(mode: str = "RGB") -> Image.Image:
    values = (np.random.RandomState(0).rand(18, 21, 3) * 255).astype(np.uint8)
    return Image.fromarray(values).convert(mode)


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "pil": _pil(),
        "pil list": [_pil(), _pil()],
        "array": np.random.RandomState(1).rand(2, 18, 21, 3).astype(np.float32),
        "tensor": torch.rand(2, 3, 18, 21, generator=g),
    }


@pytest.mark.parametrize("kind", list(_inputs()))
@pytest.mark.parametrize("size", [(None, None), (12, 16)])
def test_image_preprocess_matches(kind, size):
    image = _inputs()[kind]
    ours = VaeImageProcessor(**IMAGE_OPTIONS).preprocess(image, *size)
    ref = RefProcessor(**IMAGE_OPTIONS).preprocess(image, *size)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("resize_mode", ["fill", "crop"])
def test_image_preprocess_resize_modes_match(resize_mode):
    ours = VaeImageProcessor(**IMAGE_OPTIONS).preprocess(_pil(), 16, 8, resize_mode=resize_mode)
    ref = RefProcessor(**IMAGE_OPTIONS).preprocess(_pil(), 16, 8, resize_mode=resize_mode)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mask", [_pil("L"), _pil(), torch.rand(1, 1, 18, 21, generator=torch.Generator().manual_seed(2))])
def test_mask_preprocess_matches(mask):
    ours = VaeImageProcessor(**MASK_OPTIONS).preprocess(mask, 16, 20)
    ref = RefProcessor(**MASK_OPTIONS).preprocess(mask, 16, 20)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("output_type", ["pt", "np", "pil", "latent"])
@pytest.mark.parametrize("do_denormalize", [None, [True, False]])
def test_postprocess_matches(output_type, do_denormalize):
    decoded = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    ours = VaeImageProcessor().postprocess(decoded, output_type, do_denormalize)
    ref = RefProcessor().postprocess(decoded, output_type, do_denormalize)
    if output_type == "pil":
        assert [np.asarray(o).tolist() for o in ours] == [np.asarray(r).tolist() for r in ref]
    elif output_type == "np":
        np.testing.assert_allclose(ours, ref, atol=1e-7)
    else:
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


def test_helpers_match():
    mask = Image.new("L", (40, 30))
    mask.paste(255, (10, 5, 20, 12))
    assert VaeImageProcessor.get_crop_region(mask, 16, 16, pad=2) == RefProcessor.get_crop_region(mask, 16, 16, pad=2)
    assert VaeImageProcessor().get_default_height_width(_pil()) == RefProcessor().get_default_height_width(_pil())
    blurred, ref_blurred = VaeImageProcessor.blur(mask, 3), RefProcessor.blur(mask, 3)
    assert np.array_equal(np.asarray(blurred), np.asarray(ref_blurred))
