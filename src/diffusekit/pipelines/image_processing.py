"""Image pre- and post-processing shared by the pipelines."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Convert images in [0, 1], shaped (N, H, W, C) or (H, W, C), to PIL images."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def postprocess_images(images: torch.Tensor, output_type: str = "pil", from_minus_one: bool = True,
                       do_denormalize: Sequence[bool] | None = None):
    """Turn a model-space batch (N, C, H, W) into the requested ``output_type``: pil, np or pt.

    ``do_denormalize`` (one flag per image, as the reference's VAE image processor takes it) maps
    only the flagged images from [-1, 1] to [0, 1] and leaves the others untouched (e.g. the black
    images of the safety checker).
    """
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    if do_denormalize is not None:
        if len(do_denormalize) != images.shape[0]:
            raise ValueError(f"do_denormalize has {len(do_denormalize)} flags for {images.shape[0]} images")
        images = torch.stack([(im / 2 + 0.5).clamp(0, 1) if flag else im for im, flag in zip(images, do_denormalize)])
    else:
        if from_minus_one:
            images = images / 2 + 0.5
        images = images.clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return numpy_to_pil(array) if output_type == "pil" else array


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized PIL images into one image, row by row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _multiple_below(size: int, multiple: int) -> int:
    return size - size % multiple


def _resize_nearest(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(images, size=(height, width))


def preprocess_images(image, height: int | None = None, width: int | None = None, multiple: int = 8,
                      latent_channels: int | None = 4, normalize: bool = True) -> torch.Tensor:
    """Pipeline image input to a float tensor (N, C, H, W) in [-1, 1], as the reference prepares it.

    ``image``: a PIL image, a numpy array (H, W, C) or (N, H, W, C) in [0, 1], a tensor (C, H, W)
    or (N, C, H, W) in [0, 1], or a list of one of these. The size is ``height`` x ``width``, by
    default the input's, rounded down to a multiple of ``multiple`` (the VAE scale factor); PIL
    images are resized with Lanczos, arrays and tensors with nearest-neighbour interpolation.
    A tensor with ``latent_channels`` channels is taken to be latents and returned unchanged. A tensor
    or array with negative values is taken to be in [-1, 1] already (with a warning, as the reference).
    """
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError("image is an empty list")
    first = images[0]
    if isinstance(first, Image.Image):
        if not all(isinstance(i, Image.Image) for i in images):
            raise ValueError("image: a list must hold images of one kind")
        height = _multiple_below(height or first.height, multiple)
        width = _multiple_below(width or first.width, multiple)
        arrays = [np.array(i.resize((width, height), resample=Image.LANCZOS)).astype(np.float32) / 255.0
                  for i in images]
        batch = _numpy_to_tensor(np.stack(arrays, axis=0))
    elif isinstance(first, np.ndarray):
        batch = np.concatenate(images, axis=0) if first.ndim == 4 else np.stack(images, axis=0)
        batch = _numpy_to_tensor(batch)
        batch = _resize_nearest(batch, _multiple_below(height or batch.shape[2], multiple),
                                _multiple_below(width or batch.shape[3], multiple))
    elif isinstance(first, torch.Tensor):
        batch = torch.cat(images, dim=0) if first.ndim == 4 else torch.stack(images, dim=0)
        if latent_channels is not None and batch.shape[1] == latent_channels:
            return batch
        batch = _resize_nearest(batch, _multiple_below(height or batch.shape[2], multiple),
                                _multiple_below(width or batch.shape[3], multiple))
    else:
        raise ValueError(f"image must be a PIL image, numpy array or torch tensor (or a list), got {type(first).__name__}")
    if normalize and batch.min() < 0:
        warnings.warn("image has values below 0; taking it to be in [-1, 1] already (expected [0, 1])",
                      FutureWarning, stacklevel=2)
        normalize = False
    return 2.0 * batch - 1.0 if normalize else batch


def _numpy_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) array to an (N, C, H, W) tensor."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(images.transpose(0, 3, 1, 2))
