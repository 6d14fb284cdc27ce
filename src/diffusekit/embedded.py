"""The small class-conditional digits model shipped inside the package, and a demo grid from it."""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

EMBEDDED_MODELS = ("digits",)
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


def _copy_tree(source, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_tree(entry, target / entry.name)
        else:
            with entry.open("rb") as src, open(target / entry.name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def load_embedded_pipeline(name: str = "digits", device: str | torch.device | None = None):
    """The embedded ClassConditionalPipeline (digits 0-9, 16x16 grey), loaded from package resources."""
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
