"""A synthetic captioned data set: flat-coloured shapes on a plain background, made in code.

Each 64x64 RGB image holds one or two shapes (circle, square, triangle), about a quarter of the
image wide, centred in a cell of a 3x3 grid with a small jitter in size and place, and a caption
from a fixed grammar::

    a red circle at the top left on a white background
    a blue square on the left and a yellow triangle at the bottom on a gray background

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same images
and captions. Combinations in :data:`HELD_OUT` never appear in the training split; they measure
how the model generalises (``split="held_out"`` draws scenes that contain one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 80, 230),
    "yellow": (240, 215, 30), "purple": (140, 40, 180), "orange": (245, 135, 15),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
#: Position phrases, row-major over the 3x3 grid (index = 3 * row + column).
POSITIONS = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
             "on the right", "at the bottom left", "at the bottom", "at the bottom right")
#: (colour, shape, position) patterns kept out of training; None matches anything.
HELD_OUT = (("green", "triangle", None), ("purple", "square", "at the bottom right"))

RESOLUTION = 64
SHAPE_SIZE = 16  # pixels, a quarter of the image width
SIZE_JITTER = 2  # the side varies by up to this many pixels either way
PLACE_JITTER = 2  # and the centre moves by up to this many pixels on each axis
SUPERSAMPLE = 4  # edges are antialiased by drawing at 4x and averaging
#: How shapes are drawn: filled, or as a 2-pixel outline (the example style LoRA's data).
STYLES = ("filled", "outlined")
OUTLINE_WIDTH = 2.0


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    position: str

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {self.position}"

    def held_out(self) -> bool:
        return any(all(want is None or want == have for want, have in zip(pattern, (self.colour, self.shape,
                                                                                    self.position)))
                   for pattern in HELD_OUT)


@dataclass(frozen=True)
class ShapeScene:
    objects: tuple[ShapeObject, ...]
    background: str

    @property
    def caption(self) -> str:
        return " and ".join(obj.phrase for obj in self.objects) + f" on a {self.background} background"

    def held_out(self) -> bool:
        return any(obj.held_out() for obj in self.objects)


def grammar_words() -> set[str]:
    """Every word the caption grammar uses."""
    phrases = [*COLOURS, *SHAPES, *BACKGROUNDS, *POSITIONS, "a and on background"]
    return {word for phrase in phrases for word in phrase.split()}


def cell_centre(position: str, resolution: int = RESOLUTION) -> tuple[float, float]:
    """(x, y) of the centre of a position's grid cell, in pixels."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    row, column = divmod(POSITIONS.index(position), 3)
    cell = resolution / 3
    return (column + 0.5) * cell, (row + 0.5) * cell


def random_scene(rng: np.random.Generator, num_objects: int, split: str = "train") -> ShapeScene:
    """A scene of ``num_objects`` (1 or 2, in distinct cells) for ``split``: "train" (no held-out
    combination) or "held_out" (at least one)."""
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    while True:
        cells = rng.choice(len(POSITIONS), size=num_objects, replace=False)
        objects = tuple(ShapeObject(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), POSITIONS[int(cell)])
                        for cell in cells)
        scene = ShapeScene(objects, str(rng.choice(list(BACKGROUNDS))))
        if scene.held_out() == (split == "held_out"):
            return scene


def shape_mask(shape: str, centre: tuple[float, float], size: float, resolution: int = RESOLUTION,
               inset: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1] (H, W) of a shape of side ``size`` centred at ``centre`` (triangles point up),
    its edges moved ``inset`` pixels inwards."""
    grid = resolution * SUPERSAMPLE
    coords = (np.arange(grid) + 0.5) / SUPERSAMPLE
    x, y = coords[None, :] - centre[0], coords[:, None] - centre[1]
    half = size / 2
    if shape == "circle":
        inside = x * x + y * y <= (half - inset) ** 2
    elif shape == "square":
        inside = (np.abs(x) <= half - inset) & (np.abs(y) <= half - inset)
    elif shape == "triangle":  # apex at the top centre, base along the bottom edge; sides have slope 2
        inside = (y <= half - inset) & (np.abs(x) <= (y + half) / 2 - inset * np.sqrt(5) / 2)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: ShapeScene, rng: np.random.Generator, resolution: int = RESOLUTION,
           style: str = "filled") -> np.ndarray:
    """The scene as a uint8 (H, W, 3) image, with jitter drawn from ``rng``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    image = np.empty((resolution, resolution, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    scale = resolution / RESOLUTION
    for obj in scene.objects:
        cx, cy = cell_centre(obj.position, resolution)
        dx, dy = rng.uniform(-PLACE_JITTER, PLACE_JITTER, size=2) * scale
        size = (SHAPE_SIZE + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * scale
        coverage = shape_mask(obj.shape, (cx + dx, cy + dy), size, resolution)
        if style == "outlined":  # the shape less its inside, the outline width in from every edge
            inner = shape_mask(obj.shape, (cx + dx, cy + dy), size, resolution, inset=OUTLINE_WIDTH * scale)
            coverage = np.clip(coverage - inner, 0, 1)
        coverage = coverage[..., None]
        image = image * (1 - coverage) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_shapes(count: int, seed: int = 0, split: str = "train", two_object_fraction: float = 0.5,
                resolution: int = RESOLUTION, style: str = "filled") -> tuple[np.ndarray, list[ShapeScene]]:
    """``count`` images (N, H, W, 3) uint8 and their scenes (``scene.caption`` is the text)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    rng = np.random.default_rng(seed)
    scenes, images = [], np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for index in range(count):
        scene = random_scene(rng, 2 if rng.random() < two_object_fraction else 1, split)
        images[index] = render(scene, rng, resolution, style)
        scenes.append(scene)
    return images, scenes


def make_dense_shapes(count: int, seed: int = 0, max_objects: int = 9, resolution: int = RESOLUTION,
                      style: str = "filled") -> np.ndarray:
    """``count`` uint8 images (N, H, W, 3) of 1 to ``max_objects`` shapes in distinct cells, held-out
    combinations included, without captions: autoencoder training data, with much more of each image
    covered by shapes than in the captioned set."""
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in [1, {len(POSITIONS)}], got {max_objects}")
    rng = np.random.default_rng(seed)
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for index in range(count):
        cells = rng.choice(len(POSITIONS), size=int(rng.integers(1, max_objects + 1)), replace=False)
        objects = tuple(ShapeObject(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), POSITIONS[int(cell)])
                        for cell in cells)
        images[index] = render(ShapeScene(objects, str(rng.choice(list(BACKGROUNDS)))), rng, resolution, style)
    return images


def parse_caption(caption: str) -> ShapeScene:
    """The scene a grammar caption describes; ValueError naming the part that does not parse."""
    text = caption.strip().lower()
    head, sep, tail = text.rpartition(" on a ")
    background = tail.removesuffix(" background")
    if not sep or not tail.endswith(" background") or background not in BACKGROUNDS:
        raise ValueError(f"caption {caption!r}: expected it to end with 'on a {{{'|'.join(BACKGROUNDS)}}} background'")
    objects = []
    for phrase in head.split(" and "):
        words = phrase.split(" ", 3)
        if len(words) != 4 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES \
                or words[3] not in POSITIONS:
            raise ValueError(f"caption {caption!r}: cannot read the object {phrase!r} "
                             "(expected 'a COLOUR SHAPE POSITION')")
        objects.append(ShapeObject(words[1], words[2], words[3]))
    if len(objects) > 2:
        raise ValueError(f"caption {caption!r}: at most two objects, got {len(objects)}")
    return ShapeScene(tuple(objects), background)
