"""pipe.image_processor / pipe.mask_processor: what a call does to its images, usable outside a call."""

import numpy as np
import torch
from PIL import Image

from diffusekit import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusekit.image_processor import VaeImageProcessor
from diffusekit.pipelines.vae_codec import latent_sample
from flux_components import tiny_flux_pipeline


def _picture(size: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(1).rand(size, size, 3) * 255).astype(np.uint8))


def _mask(size: int = 32) -> Image.Image:
    mask = Image.new("RGB", (size, size))
    mask.paste((255, 255, 255), (0, 0, size // 2, size))
    return mask


def test_sd_and_flux_pipelines_carry_an_image_processor(parts, tmp_path):
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    processor = pipe.image_processor
    assert isinstance(processor, VaeImageProcessor) and processor is pipe.image_processor
    assert processor.config.vae_scale_factor == pipe.vae_scale_factor == 2
    assert processor.config.do_normalize and not hasattr(pipe, "mask_processor")
    flux = tiny_flux_pipeline(tmp_path)
    assert flux.image_processor.config.vae_scale_factor == 2 * flux.vae_scale_factor  # 2x2 latent patches


def test_inpainting_with_latents_from_the_processors_matches_pil_inputs(parts):
    pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    mask_processor = pipe.mask_processor
    assert mask_processor.config.do_binarize and mask_processor.config.do_convert_grayscale
    assert not mask_processor.config.do_normalize
    common = dict(prompt="the cat", num_inference_steps=2, strength=0.9, output_type="np")
    from_pil = pipe(image=_picture(), mask_image=_mask(), generator=torch.Generator().manual_seed(0), **common).images

    image = pipe.image_processor.preprocess(_picture())
    mask = mask_processor.preprocess(_mask())
    assert image.shape == (1, 3, 32, 32) and mask.shape == (1, 1, 32, 32)
    generator = torch.Generator().manual_seed(0)
    scale = pipe.vae.config.scaling_factor
    image_latents = latent_sample(pipe.vae.encode(image), generator) * scale
    torch.randn((1, 4, 16, 16), generator=generator)  # the call draws its noise between the two encodings
    masked_latents = latent_sample(pipe.vae.encode(image * (mask < 0.5)), generator) * scale
    generator = torch.Generator().manual_seed(0)
    torch.randn((1, 4, 16, 16), generator=generator)  # the image's encoding, done above
    from_latents = pipe(image=image_latents, mask_image=mask, masked_image_latents=masked_latents,
                        generator=generator, **common).images
    np.testing.assert_allclose(from_latents, from_pil, atol=1e-5)
