"""Image pre- and post-processing shared by the pipelines."""

from __future__ import annotations

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


def postprocess_images(images: torch.Tensor, output_type: str = "pil", from_minus_one: bool = True):
    """Turn a model-space batch (N, C, H, W) into the requested ``output_type``: pil, np or pt."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
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
