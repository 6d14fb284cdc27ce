"""An analytic checker for the shapes text-to-image model: does the image show what the caption says?

    python benchmarks/shapes_check.py --model DIR [--count 200] [--seed 0] [--out results.json] [--grid grid.png]
    python benchmarks/shapes_check.py --validate [--count 2000]    # the data set's own images, no model

No learned parts (numpy and scipy.ndimage only). The background is the nearest of ``BACKGROUNDS`` to
the median border pixel. Every pixel is then read as a blend ``background + alpha * (colour -
background)`` for each of ``COLOURS``: its colour is the one whose blend line passes closest, and it
belongs to an object where alpha > 0.5 (antialiased and blurred edges lie on that line, so they
neither change colour nor grow the object). Connected regions of one colour, less tiny ones, are the
objects: the centroid gives the 3x3 grid cell, and the shape is the one of circle / square / upward
triangle that, drawn in the object's bounding box, overlaps its pixels best (intersection over union).

Generation mirrors ``diffusekit generate MODEL --prompt ...`` (its option parser, pipeline loading and
call arguments, so its defaults for steps and guidance), image i seeded ``seed + i``, several prompts
per pipeline call.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffusekit.training.shapes import (
    BACKGROUNDS, COLOURS, POSITIONS, SHAPES, ShapeObject, ShapeScene, cell_centre, make_shapes, parse_caption,
    random_scene,
)

BORDER = 2  # pixels of each edge that make up the background sample (at 64x64)
ALPHA_MIN = 0.5  # blend weight above which a pixel belongs to an object
RESIDUAL_MAX = 60.0  # farther than this (0..255 RGB distance) from every blend line: no colour, ignored
MIN_AREA = 24  # pixels (at 64x64); smaller regions are noise
HELD_OUT_SHARE = 0.25  # of the drawn prompts of each object count

_COLOUR_NAMES = list(COLOURS)
_COLOUR_TABLE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class FoundObject:
    colour: str
    shape: str
    position: str
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels


@dataclass(frozen=True)
class ObjectCheck:
    colour: bool
    shape: bool
    position: bool
    found: FoundObject | None

    @property
    def all_right(self) -> bool:
        return self.colour and self.shape and self.position


@dataclass(frozen=True)
class ImageCheck:
    background: bool
    objects: tuple[ObjectCheck, ...]  # one per caption object, in caption order
    found_count: int

    @property
    def all_right(self) -> bool:
        return all(check.all_right for check in self.objects)


# -- reading an image -------------------------------------------------------------------------------

def _as_array(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be RGB of shape (H, W, 3), got {array.shape}")
    return array.astype(np.float32)


def find_background(image) -> str:
    """The name of the background: the nearest of BACKGROUNDS to the median border pixel."""
    array = _as_array(image)
    border = max(1, round(BORDER * min(array.shape[:2]) / 64))
    mask = np.ones(array.shape[:2], dtype=bool)
    mask[border:-border, border:-border] = False
    median = np.median(array[mask], axis=0)
    return min(BACKGROUNDS, key=lambda name: float(np.sum((median - BACKGROUNDS[name]) ** 2)))


def blend_labels(array: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index into COLOURS of the nearest blend line (-1 where no object), and alpha."""
    offset = array - np.asarray(BACKGROUNDS[background], dtype=np.float32)  # (H, W, 3)
    directions = _COLOUR_TABLE - np.asarray(BACKGROUNDS[background], dtype=np.float32)  # (C, 3)
    alpha = np.clip(np.einsum("hwk,ck->hwc", offset, directions) / np.sum(directions**2, axis=1), 0.0, None)
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * directions, axis=-1)
    index = residual.argmin(axis=-1)
    best_alpha = np.take_along_axis(alpha, index[..., None], axis=-1)[..., 0]
    best_residual = np.take_along_axis(residual, index[..., None], axis=-1)[..., 0]
    index[(best_alpha <= ALPHA_MIN) | (best_residual > RESIDUAL_MAX)] = -1
    return index, best_alpha


def _template(shape: str, height: int, width: int) -> np.ndarray:
    """The shape filling a height x width box (pixel centres), as a boolean mask."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (x + 0.5) / width - 0.5, (y + 0.5) / height - 0.5  # in [-0.5, 0.5]
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    return np.abs(u) <= (v + 0.5) / 2  # triangle: apex at the top centre, base along the bottom


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, drawn in the bounding box of ``mask`` (or that box less a pixel on
    some sides, so that stray edge pixels do not widen it), overlaps ``mask`` best."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    area = int(mask.sum())
    def overlap(shape: str) -> float:
        best = 0.0
        for cut_top, cut_bottom, cut_left, cut_right in itertools.product((0, 1), repeat=4):
            box = mask[top + cut_top:bottom - cut_bottom, left + cut_left:right - cut_right]
            template = _template(shape, *box.shape)
            inside = int(np.sum(template & box))
            best = max(best, inside / (area + int(template.sum()) - inside))
        return best
    return max(SHAPES, key=overlap)


def position_of(centroid: tuple[float, float], height: int, width: int) -> str:
    """The grid cell's position phrase of an (x, y) point."""
    column = min(2, max(0, int(centroid[0] * 3 // width)))
    row = min(2, max(0, int(centroid[1] * 3 // height)))
    return POSITIONS[3 * row + column]


def find_objects(image, background: str | None = None) -> list[FoundObject]:
    """Every object in the image, largest first."""
    array = _as_array(image)
    height, width = array.shape[:2]
    index, _ = blend_labels(array, background or find_background(array))
    min_area = MIN_AREA * height * width / 64**2
    found = []
    for colour_index, colour in enumerate(_COLOUR_NAMES):
        regions, _ = ndimage.label(index == colour_index, structure=np.ones((3, 3)))
        areas = np.bincount(regions.ravel())
        for region in np.flatnonzero(areas[1:] >= min_area) + 1:
            mask = regions == region
            area = int(areas[region])
            rows, cols = np.nonzero(mask)
            centroid = (float(cols.mean()) + 0.5, float(rows.mean()) + 0.5)
            found.append(FoundObject(colour, classify_shape(mask), position_of(centroid, height, width), area,
                                     centroid))
    return sorted(found, key=lambda obj: -obj.area)


# -- comparing with the caption ---------------------------------------------------------------------

def _object_check(wanted: ShapeObject, found: FoundObject | None) -> ObjectCheck:
    if found is None:
        return ObjectCheck(False, False, False, None)
    return ObjectCheck(found.colour == wanted.colour, found.shape == wanted.shape, found.position == wanted.position,
                       found)


def _match(wanted: tuple[ShapeObject, ...], found: list[FoundObject], size: tuple[int, int]) -> list:
    """A found object (or None) for each caption object: one object, the largest; several, the
    assignment that matches the most colours, then lies nearest to the caption's cells."""
    if len(wanted) == 1:
        return [found[0] if found else None]
    height, width = size
    def cost(pairs) -> tuple[int, float]:
        mismatched, distance = 0, 0.0
        for obj, candidate in pairs:
            if candidate is None:
                mismatched, distance = mismatched + 2, distance + width + height
                continue
            cx, cy = cell_centre(obj.position, 1)
            mismatched += candidate.colour != obj.colour
            distance += float(np.hypot(candidate.centroid[0] - cx * width, candidate.centroid[1] - cy * height))
        return mismatched, distance
    candidates = found[:6] + [None] * len(wanted)  # the largest few; None when too few were found
    options = (list(zip(wanted, chosen)) for chosen in itertools.permutations(candidates, len(wanted))
               if all(a is None or a is not b for a, b in itertools.combinations(chosen, 2)))
    return [candidate for _, candidate in min(options, key=cost)]


def check_image(image, scene: ShapeScene | str) -> ImageCheck:
    """Whether ``image`` shows ``scene`` (a ShapeScene or a caption): background, and per caption
    object its colour, shape and position."""
    if isinstance(scene, str):
        scene = parse_caption(scene)
    array = _as_array(image)
    background = find_background(array)
    found = find_objects(array, background)
    matched = _match(scene.objects, found, array.shape[:2])
    return ImageCheck(background == scene.background,
                      tuple(_object_check(obj, hit) for obj, hit in zip(scene.objects, matched)), len(found))


# -- scoring many images ----------------------------------------------------------------------------

def _rate(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(checks: list[ImageCheck], scenes: list[ShapeScene]) -> dict:
    """Rates over one group of images: one-object prompts (colour, shape, position, all three, a single
    object found) and two-object prompts (both right, objects right), and the background."""
    one = [check for check, scene in zip(checks, scenes) if len(scene.objects) == 1]
    two = [check for check, scene in zip(checks, scenes) if len(scene.objects) == 2]
    firsts = [check.objects[0] for check in one]
    return {
        "count": len(checks),
        "background": _rate([check.background for check in checks]),
        "one_object": {
            "count": len(one), "colour": _rate([c.colour for c in firsts]), "shape": _rate([c.shape for c in firsts]),
            "position": _rate([c.position for c in firsts]), "all": _rate([c.all_right for c in firsts]),
            "single_object_found": _rate([check.found_count == 1 for check in one]),
        },
        "two_objects": {
            "count": len(two), "both_right": _rate([check.all_right for check in two]),
            "objects_right": _rate([c.all_right for check in two for c in check.objects]),
        },
    }


def score(pairs) -> dict:
    """Rates over (image, caption or ShapeScene) pairs: all of them, and split into seen and held-out scenes."""
    checks, scenes = [], []
    for image, scene in pairs:
        scene = parse_caption(scene) if isinstance(scene, str) else scene
        checks.append(check_image(image, scene))
        scenes.append(scene)
    return _scores(checks, scenes)


def _scores(checks: list[ImageCheck], scenes: list[ShapeScene]) -> dict:
    groups = {"all": lambda scene: True, "seen": lambda scene: not scene.held_out(), "held_out": ShapeScene.held_out}
    return {name: summarise([c for c, s in zip(checks, scenes) if keep(s)], [s for s in scenes if keep(s)])
            for name, keep in groups.items()}


def lowest_rate(scores: dict) -> float:
    """The lowest of every rate in ``score``'s result (None rates, of empty groups, left out)."""
    rates = [value for group in scores.values() for part in ("one_object", "two_objects")
             for key, value in group[part].items() if key not in ("count", "single_object_found") and value is not None]
    rates += [group["background"] for group in scores.values() if group["background"] is not None]
    return min(rates)


def table(scores: dict) -> str:
    """A markdown table of ``score``'s result."""
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"
    lines = ["| scenes | n | one: colour | shape | position | all three | single object | two: both right "
             "| objects right | background |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, group in scores.items():
        one, two = group["one_object"], group["two_objects"]
        lines.append(f"| {name} | {group['count']} ({one['count']} + {two['count']}) | {cell(one['colour'])} "
                     f"| {cell(one['shape'])} | {cell(one['position'])} | {cell(one['all'])} "
                     f"| {cell(one['single_object_found'])} | {cell(two['both_right'])} "
                     f"| {cell(two['objects_right'])} | {cell(group['background'])} |")
    return "\n".join(lines)


# -- prompts, generation, the command ---------------------------------------------------------------

def draw_scenes(count: int, seed: int) -> list[ShapeScene]:
    """``count`` scenes, half with one object and half with two, HELD_OUT_SHARE of each half held-out."""
    if count < 2:
        raise ValueError(f"count must be at least 2, got {count}")
    rng = np.random.default_rng(seed)
    scenes = []
    for num_objects, group in ((1, count // 2), (2, count - count // 2)):
        held = round(group * HELD_OUT_SHARE)
        scenes += [random_scene(rng, num_objects, "train") for _ in range(group - held)]
        scenes += [random_scene(rng, num_objects, "held_out") for _ in range(held)]
    return scenes


def generate(model: str, captions: list[str], seed: int, batch: int, device: str,
             extra: list[str]) -> tuple[list[np.ndarray], dict]:
    """The image of each caption as ``diffusekit generate MODEL --prompt CAPTION --seed seed+i`` makes it,
    ``batch`` prompts per call; and the steps and guidance used. ``extra``: more ``generate`` options."""
    import torch

    from diffusekit.cli import build_parser
    from diffusekit.cli_generate import call_arguments, check_options, load_pipeline, resolved_values
    from diffusekit.cli_system import check_device, set_threads

    size = [] if {"--height", "--width"} & set(extra) else ["--height", "64", "--width", "64"]
    args = build_parser().parse_args(["generate", model, "--prompt", captions[0], "--device", device, *size, *extra])
    check_options(args)
    set_threads(args.threads)
    pipe, _ = load_pipeline(args, check_device(args.device))
    pipe.set_progress_bar_config(disable=True)
    images, resolved = [], {}
    for start in range(0, len(captions), batch):
        args.prompt = captions[start:start + batch]
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(start, start + len(args.prompt))]
        kwargs = call_arguments(pipe, args, None, generators)
        resolved = resolved_values(pipe, args, kwargs)
        images += [np.asarray(image.convert("RGB")) for image in pipe(**kwargs).images]
    return images, {"steps": resolved["steps"], "guidance": resolved["guidance"]}


def degrade(images: np.ndarray, noise: float, blur: float, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 blurred (Gaussian, ``blur`` pixels) then with Gaussian noise
    (``noise`` on 0..255) added: a stand-in for a generated image's flaws."""
    out = images.astype(np.float32)
    if blur > 0:
        out = ndimage.gaussian_filter(out, sigma=(0, blur, blur, 0))
    out += np.random.default_rng(seed).normal(0.0, noise, size=out.shape) if noise > 0 else 0.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_grid(images: list[np.ndarray], checks: list[ImageCheck], path: Path) -> None:
    """All images in a grid, each framed green when all its objects are right, else red."""
    from PIL import Image

    from diffusekit.pipelines.image_grid import make_image_grid

    framed = []
    for image, check in zip(images, checks):
        frame = np.pad(image, ((2, 2), (2, 2), (0, 0)))
        frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = [(40, 200, 40) if check.all_right else (220, 30, 30)] * 4
        framed.append(Image.fromarray(frame))
    cols = int(np.ceil(np.sqrt(len(framed))))
    rows = int(np.ceil(len(framed) / cols))
    framed += [Image.new("RGB", framed[0].size)] * (rows * cols - len(framed))
    make_image_grid(framed, rows, cols, gap=2).save(path)


def _item(scene: ShapeScene, check: ImageCheck, seed: int | None) -> dict:
    return {"caption": scene.caption, "seed": seed, "held_out": scene.held_out(), "all_right": check.all_right,
            "background_right": check.background, "found_count": check.found_count,
            "objects": [{"colour": c.colour, "shape": c.shape, "position": c.position,
                         "found": asdict(c.found) if c.found else None} for c in check.objects]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False,
                                     epilog="Other options (--steps, --guidance, --scheduler, --dtype...) go to "
                                            "`diffusekit generate` as they are; unset, its defaults apply.")
    parser.add_argument("--model", help="the text-to-image pipeline folder")
    parser.add_argument("--validate", action="store_true", help="score the data set's own images (no model)")
    parser.add_argument("--count", type=int, default=200, help="prompts (--validate: data set images)")
    parser.add_argument("--seed", type=int, default=0, help="draws the prompts; image i is seeded seed + i")
    parser.add_argument("--batch", type=int, default=20, help="prompts per pipeline call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--noise", type=float, default=0.0, help="--validate: add Gaussian noise of this sigma")
    parser.add_argument("--blur", type=float, default=0.0, help="--validate: blur with this sigma (pixels) first")
    parser.add_argument("--out", type=Path, help="write the scores and every image's result as JSON")
    parser.add_argument("--grid", type=Path, help="write a PNG grid of the images (green frame: all right)")
    args, extra = parser.parse_known_args(argv)
    if args.validate == (args.model is not None):
        parser.error("give --model DIR or --validate")
    if args.validate and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.validate:
        images, scenes = make_shapes(args.count, seed=args.seed)
        images = degrade(images, args.noise, args.blur, args.seed)
        record = {"validate": True, "noise": args.noise, "blur": args.blur}
        seeds = [None] * len(scenes)
    else:
        scenes = draw_scenes(args.count, args.seed)
        images, record = generate(args.model, [s.caption for s in scenes], args.seed, args.batch, args.device, extra)
        record = {"model": str(Path(args.model).resolve()), **record, "options": extra}
        seeds = [args.seed + i for i in range(len(scenes))]
    checks = [check_image(image, scene) for image, scene in zip(images, scenes)]
    scores = _scores(checks, scenes)
    print(table(scores))
    if args.out:
        items = [_item(scene, check, s) for scene, check, s in zip(scenes, checks, seeds)]
        args.out.write_text(json.dumps({**record, "count": len(scenes), "seed": args.seed, "scores": scores,
                                        "items": items}, indent=1), encoding="utf-8")
    if args.grid:
        write_grid(list(images), checks, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
