"""Tiling images into one grid image."""

from __future__ import annotations

from PIL import Image


def make_image_grid(images: list[Image.Image], rows: int, cols: int, scale: int = 1) -> Image.Image:
    """Tile ``rows * cols`` equally sized images row by row; ``scale`` enlarges each (nearest)."""
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    width, height = images[0].size
    width, height = width * scale, height * scale
    grid = Image.new(images[0].mode, (cols * width, rows * height))
    for i, image in enumerate(images):
        if image.size != (width // scale, height // scale):
            raise ValueError(f"image {i} is {image.size}, expected {(width // scale, height // scale)}")
        if scale > 1:
            image = image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid
