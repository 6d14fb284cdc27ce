"""The served models: loaded once, chosen by name, and a job's parameters turned into the ``generate``
options so a served image equals the command line's for the same parameters and seed."""

from __future__ import annotations

import argparse
import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli_generate import EMBEDDED_MODEL, EMBEDDED_TEXT_MODEL, class_names, load_pipeline

#: The name of the embedded digits model in requests.
DEFAULT_MODEL = "digits"
#: What ``diffusekit serve`` serves when given no model: both embedded models.
DEFAULT_SPECS = (f"{DEFAULT_MODEL}={EMBEDDED_MODEL}", f"shapes={EMBEDDED_TEXT_MODEL}")


class FieldError(ValueError):
    """A request field that cannot be used: answered 4xx with the field's name."""

    def __init__(self, field_name: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field, self.reason, self.status = field_name, message, status


@dataclass
class ServedModel:
    """One loaded pipeline and what a request may ask of it."""

    name: str
    source: str
    pipe: Any
    loaded: dict = field(default_factory=dict)
    #: The LoRAs a job may turn on, by name: the file records (path, sha256) of those loaded into ``pipe``.
    loras: dict[str, dict] = field(default_factory=dict)

    @property
    def accepted(self) -> set[str]:
        return set(inspect.signature(self.pipe.__call__).parameters)

    @property
    def classes(self) -> list[str] | None:
        """Class names of a class-conditional model (numbers when it saved none); None otherwise."""
        if "class_labels" not in self.accepted:
            return None
        return class_names(self.source) or [str(i) for i in range(self.pipe.unet.config.num_class_embeds - 1)]

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(width, height) of a model that makes one size only."""
        if "height" in self.accepted:
            return None
        size = self.pipe.unet.config.sample_size
        height, width = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return width, height

    def default(self, name: str) -> Any:
        parameter = inspect.signature(self.pipe.__call__).parameters.get(name)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def describe(self) -> dict[str, Any]:
        width, height = self.fixed_size or (None, None)
        return {"name": self.name, "pipeline": type(self.pipe).__name__, "classes": self.classes,
                "takes_prompt": "prompt" in self.accepted, "takes_image": "image" in self.accepted,
                "width": width, "height": height, "default_steps": self.default("num_inference_steps"),
                "default_guidance_scale": self.default("guidance_scale"),
                "scheduler": type(self.pipe.scheduler).__name__, "loras": sorted(self.loras)}

    def use_loras(self, loras: list[dict[str, Any]]) -> dict:
        """Turn on exactly the job's ``[{name, scale}]`` (none: all off) and return the run's load
        record. Jobs run one at a time per worker, so switching the shared layers is safe here."""
        if not self.loras:
            return self.loaded
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([lora["name"] for lora in loras], [lora["scale"] for lora in loras])
        else:
            self.pipe.disable_lora()
        return {**self.loaded, "loras": [dict(self.loras[lora["name"]], scale=lora["scale"]) for lora in loras]}


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``name=MODEL`` -> (name, MODEL); a bare MODEL is named after its last path part."""
    name, sep, source = spec.partition("=")
    if sep and name and "/" not in name:
        return name, source
    return Path(spec.rstrip("/")).name or spec, spec


def load_models(specs: list[str], device, loras: list[str] = ()) -> dict[str, ServedModel]:
    """Load every ``MODEL`` or ``name=MODEL`` (none: the embedded digits and shapes models), keyed by name, with
    every ``name=LORA_FILE`` loaded (off) into each model that takes LoRAs."""
    specs = specs or list(DEFAULT_SPECS)
    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, source = parse_model_spec(spec)
        if name in models:
            raise ValueError(f"model name {name!r} given twice; name them: NAME=MODEL")
        options = argparse.Namespace(model=source, dtype=None, scheduler=None, lora=[], embedding=[], image=None,
                                     mask=None)
        pipe, loaded = load_pipeline(options, device)
        pipe.set_progress_bar_config(disable=True)
        models[name] = ServedModel(name, source, pipe, loaded, _load_loras(pipe, loras))
    if loras and not any(model.loras for model in models.values()):
        raise ValueError(f"--lora: none of the served models takes LoRAs ({', '.join(models)})")
    return models


def _load_loras(pipe, specs) -> dict[str, dict]:
    """Each ``name=PATH`` (or PATH, named after its file) loaded as adapter ``name``, all turned off."""
    from ..cli_metadata import file_record

    if not specs or not hasattr(pipe, "load_lora_weights"):
        return {}
    records = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).stem, spec)
        if name in records:
            raise ValueError(f"--lora: the name {name!r} is given twice; name them: NAME=FILE")
        pipe.load_lora_weights(path, adapter_name=name)
        records[name] = file_record(path)
    pipe.disable_lora()
    return records


def generate_options(model: ServedModel, params: dict[str, Any], out: Path, files: dict[str, Path]) -> argparse.Namespace:
    """The ``diffusekit generate`` options that a stored job's ``params`` mean (``files``: decoded inputs)."""
    label = params.get("class_label")
    return argparse.Namespace(
        model=model.source, prompt=params.get("prompt"), negative_prompt=params.get("negative_prompt"),
        steps=params.get("steps"), guidance=params.get("guidance_scale"), strength=params.get("strength"),
        height=params.get("height"), width=params.get("width"), seed=params["seed"], batch=params.get("n", 1),
        class_label=None if label is None else str(label), scheduler=params.get("scheduler"),
        image=files.get("image"), mask=files.get("mask_image"), lora=[], embedding=[], dtype=None,
        out=str(out), grid=False, refiner=None, refiner_start=None)


def job_pipeline(model: ServedModel, options: argparse.Namespace):
    """The pipeline a job runs: the shared components with the job's own scheduler and task."""
    from ..cli_generate import _choose_task, _scheduler

    pipe = copy.copy(model.pipe)
    pipe.scheduler = _scheduler(model.pipe, options)
    return _choose_task(pipe, options.image is not None, options.mask is not None)

