"""VaeImageProcessor: the image and mask preparation of the pipelines as one configurable object.

The pipelines carry one as ``pipe.image_processor`` (and the inpainting pipelines a mask processor
as ``pipe.mask_processor``), so that images can be prepared, encoded or turned back into pictures
outside a call exactly as the pipeline does it. The work is done by the functions of
:mod:`diffusekit.pipelines.image_processing`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from .configuration import ConfigMixin, register_to_config
from .pipelines.image_processing import (
    binarized, image_size, mask_crop_region, numpy_to_pil, numpy_to_tensor, overlay_inpainted, postprocess_images,
    preprocess_images, preprocess_mask, tensor_to_numpy,
)

#: The ``output_type`` values of :meth:`VaeImageProcessor.postprocess`.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class VaeImageProcessor(ConfigMixin):
    """Prepares pipeline images for the VAE and turns decoded batches back into images.

    ``vae_scale_factor``: sizes are rounded down to a multiple of it (``do_resize=False`` keeps the
    input's size). ``vae_latent_channels``: a tensor with this many channels is taken as latents and
    returned unchanged. ``do_normalize``: map [0, 1] to [-1, 1] (and back in ``postprocess``).
    ``do_binarize``: values >= 0.5 become 1, the rest 0. ``do_convert_grayscale``: one channel (masks);
    otherwise images are RGB (``do_convert_rgb`` is what every image gets). PIL images are resized
    with Lanczos (``resample="lanczos"``, the only filter supported).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, do_resize: bool = True, vae_scale_factor: int = 8, vae_latent_channels: int = 4,
                 resample: str = "lanczos", do_normalize: bool = True, do_binarize: bool = False,
                 do_convert_rgb: bool = False, do_convert_grayscale: bool = False) -> None:
        if do_convert_rgb and do_convert_grayscale:
            raise ValueError("do_convert_rgb and do_convert_grayscale cannot both be True: choose RGB images "
                             "or grayscale masks")
        if resample != "lanczos":
            raise ValueError(f"resample={resample!r} is not supported; images are resized with 'lanczos'")
        if vae_scale_factor < 1:
            raise ValueError(f"vae_scale_factor must be at least 1, got {vae_scale_factor}")

    # -- conversions ------------------------------------------------------------------------------

    numpy_to_pil = staticmethod(numpy_to_pil)

    @staticmethod
    def pil_to_numpy(images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
        """PIL image(s) to a float32 array (N, H, W, C) in [0, 1] (C = 1 for grayscale)."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
        return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])

    numpy_to_pt = staticmethod(numpy_to_tensor)
    pt_to_numpy = staticmethod(tensor_to_numpy)

    @staticmethod
    def normalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[0, 1] to [-1, 1]."""
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[-1, 1] to [0, 1], clipped."""
        return (images / 2 + 0.5).clip(0, 1)

    binarize = staticmethod(binarized)

    @staticmethod
    def blur(image: Image.Image, blur_factor: int = 4) -> Image.Image:
        """A Gaussian blur of radius ``blur_factor`` (soft inpainting mask edges)."""
        return image.filter(ImageFilter.GaussianBlur(blur_factor))

    get_crop_region = staticmethod(mask_crop_region)

    def apply_overlay(self, mask: Image.Image, init_image: Image.Image, image: Image.Image,
                      crop_coords: tuple[int, int, int, int] | None = None) -> Image.Image:
        """Paste the unmasked part of ``init_image`` over the inpainted ``image`` (see
        :func:`~diffusekit.pipelines.image_processing.overlay_inpainted`)."""
        return overlay_inpainted(mask, init_image, image, crop_coords)

    # -- the pipeline steps -----------------------------------------------------------------------

    def get_default_height_width(self, image, height: int | None = None,
                                 width: int | None = None) -> tuple[int, int]:
        """``(height, width)``, by default the image's, rounded down to a multiple of the scale factor."""
        own_height, own_width = image_size(image)
        factor = self.config.vae_scale_factor
        height, width = height or own_height, width or own_width
        return height - height % factor, width - width % factor

    def preprocess(self, image, height: int | None = None, width: int | None = None, resize_mode: str = "default",
                   crops_coords: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """An image (or mask) input as the pipelines take it: a float tensor (N, C, H, W).

        ``image``: PIL image(s), arrays or tensors in [0, 1] (a tensor with ``vae_latent_channels``
        channels is returned as is). ``height`` x ``width`` default to the input's size; see
        :func:`~diffusekit.pipelines.image_processing.preprocess_images` and ``preprocess_mask`` for
        the accepted shapes, ``resize_mode`` ("default", "fill", "crop") and ``crops_coords``.
        """
        config = self.config
        if not config.do_resize:
            height = width = None
        factor = config.vae_scale_factor if config.do_resize else 1
        if config.do_convert_grayscale:
            masks = preprocess_mask(image, height, width, factor, resize_mode, crops_coords,
                                    latent_channels=config.vae_latent_channels, binarize=config.do_binarize)
            return self.normalize(masks) if config.do_normalize else masks
        images = preprocess_images(image, height, width, multiple=factor, latent_channels=config.vae_latent_channels,
                                   normalize=config.do_normalize, resize_mode=resize_mode, crops_coords=crops_coords)
        return self.binarize(images) if config.do_binarize else images

    def postprocess(self, image: torch.Tensor, output_type: str = "pil",
                    do_denormalize: Sequence[bool] | None = None):
        """A decoded batch (N, C, H, W) as ``output_type``: "pil", "np", "pt" or "latent" (unchanged).

        ``do_denormalize``: one flag per image, whether it is mapped from [-1, 1] to [0, 1]
        (default: ``do_normalize`` for every image); images not flagged are kept as they are.
        """
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"postprocess takes a torch tensor (N, C, H, W), got {type(image).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "latent":
            return image
        if do_denormalize is None:
            do_denormalize = [self.config.do_normalize] * image.shape[0]
        return postprocess_images(image, output_type, do_denormalize=do_denormalize)


def mask_image_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """The processor of inpainting masks: grayscale, binarised, not normalised."""
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


class ImageProcessorMixin:
    """``pipe.image_processor`` for pipelines with a VAE (``vae_scale_factor`` set in ``__init__``),
    built on first use: the preparation a call gives its images, for use outside a call (a call
    does not read this attribute)."""

    #: Images are multiples of this times the VAE scale factor (FLUX packs 2x2 latent patches: 2).
    _image_size_multiple = 1

    @functools.cached_property
    def image_processor(self) -> VaeImageProcessor:
        vae = self.vae
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * self._image_size_multiple,
                                 vae_latent_channels=vae.config.latent_channels if vae is not None else 4)
