"""The small models shipped inside the package, and demo grids from them: ``digits`` (class-conditional
16x16 digits) and ``shapes`` (a 64x64 text-to-image Stable Diffusion model of coloured shapes)."""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

EMBEDDED_MODELS = ("digits", "shapes")
#: A file a pipeline folder may hold: the ``generate`` options its makers recommend, e.g.
#: ``{"guidance": 3.0}``; ``diffusekit generate`` uses them for the options it is not given.
GENERATION_DEFAULTS_FILE = "diffusekit_defaults.json"
GENERATION_DEFAULT_OPTIONS = ("steps", "guidance", "scheduler")
DEMO_GUIDANCE_SCALE = 3.0
DEMO_STEPS = 25


def embedded_model_path(name: str = "digits") -> Path:
    """The folder of an embedded model in the installed package (copied out if the package is zipped)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"no embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    resource = resources.files("diffusekit").joinpath("assets", name)
    if isinstance(resource, Path):
        if not (resource / "model_index.json").is_file():
            raise FileNotFoundError(f"{resource}: the embedded model is missing from this installation")
        return resource
    target = Path(tempfile.mkdtemp(prefix=f"diffusekit-{name}-"))
    _copy_tree(resource, target)
    return target


def generation_defaults(folder: str | Path) -> dict:
    """The recommended ``generate`` options of the pipeline in ``folder`` (empty without the file);
    ValueError naming the file when it is unreadable or has other keys."""
    import json

    path = Path(folder) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the model's defaults ({err})") from None
    unknown = sorted(set(defaults) - set(GENERATION_DEFAULT_OPTIONS)) if isinstance(defaults, dict) else ["(not an object)"]
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; it may set {', '.join(GENERATION_DEFAULT_OPTIONS)}")
    return defaults


def _copy_tree(source, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_tree(entry, target / entry.name)
        else:
            with entry.open("rb") as src, open(target / entry.name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def load_embedded_pipeline(name: str = "digits", device: str | torch.device | None = None):
    """An embedded pipeline from package resources: ``digits`` (a ClassConditionalPipeline, digits 0-9,
    16x16 grey) or ``shapes`` (a StableDiffusionPipeline, 64x64)."""
    from .pipelines.pipeline_utils import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(embedded_model_path(name))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device) if device is not None else pipeline


def generate_demo_grid(out_dir: str | Path, per_class: int = 8, seed: int = 0,
                       guidance_scale: float = DEMO_GUIDANCE_SCALE, num_inference_steps: int = DEMO_STEPS,
                       scale: int = 4) -> Path:
    """Draw ``per_class`` samples of each digit 0-9 and save them as ``digits_grid.png`` (a row per digit)."""
    from .pipelines.image_grid import make_image_grid

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    pipeline = load_embedded_pipeline()
    labels = [digit for digit in range(pipeline.num_classes) for _ in range(per_class)]
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                      generator=generator).images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "digits_grid.png"
    make_image_grid(images, pipeline.num_classes, per_class, scale=scale, gap=2).save(path)
    return path


#: The prompts of the shapes demo grid, one row each (8 seeds per row).
SHAPES_DEMO_PROMPTS = (
    "a red circle at the top left on a white background",
    "a blue square in the center on a black background",
    "a yellow triangle at the bottom right on a gray background",
    "a green circle on the left on a white background",
    "a purple triangle at the top on a black background",
    "a orange square on the right on a gray background",  # the grammar says "a" before every colour
    "a red square at the top left and a blue circle at the bottom right on a white background",
    "a yellow circle on the left and a purple triangle on the right on a black background",
)


def generate_shapes_grid(out_dir: str | Path, per_prompt: int = 8, seed: int = 0, scale: int = 2) -> Path:
    """Draw ``per_prompt`` samples of each demo prompt with the shapes model (the pipeline's 50 steps,
    the model's recommended guidance) and save them as ``shapes_grid.png`` (a row per prompt)."""
    from .pipelines.image_grid import make_image_grid

    if per_prompt < 1:
        raise ValueError(f"per_prompt must be at least 1, got {per_prompt}")
    pipeline = load_embedded_pipeline("shapes")
    prompts = [prompt for prompt in SHAPES_DEMO_PROMPTS for _ in range(per_prompt)]
    generators = [torch.Generator().manual_seed(seed + i % per_prompt) for i in range(len(prompts))]
    guidance = generation_defaults(embedded_model_path("shapes")).get("guidance", 7.5)
    images = pipeline(prompts, generator=generators, guidance_scale=guidance).images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shapes_grid.png"
    make_image_grid(images, len(SHAPES_DEMO_PROMPTS), per_prompt, scale=scale, gap=2).save(path)
    return path
