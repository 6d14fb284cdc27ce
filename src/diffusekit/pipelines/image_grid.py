"""Tiling images into one grid image."""

from __future__ import annotations

from PIL import Image


def make_image_grid(images: list[Image.Image], rows: int, cols: int, scale: int = 1, gap: int = 0) -> Image.Image:
    """Tile ``rows * cols`` equally sized images row by row.

    ``scale`` enlarges each image (nearest neighbour); ``gap`` puts grey lines of that many pixels
    between them.
    """
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be at least 1 and gap at least 0, got {scale} and {gap}")
    size = images[0].size
    width, height = size[0] * scale, size[1] * scale
    grey = (128,) * len(images[0].getbands())
    grid = Image.new(images[0].mode, (cols * width + (cols - 1) * gap, rows * height + (rows - 1) * gap), grey)
    for i, image in enumerate(images):
        if image.size != size:
            raise ValueError(f"image {i} is {image.size}, expected {size}")
        if scale > 1:
            image = image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(image, ((i % cols) * (width + gap), (i // cols) * (height + gap)))
    return grid
