"""The native job request: its schema (unknown fields refused), the server's limits, and the checks
against the chosen model, each failure naming its field."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .models import FieldError, ServedModel

#: The seeds a job may ask for (image i uses seed + i, as the command line does).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 16 * 2**20
    max_n: int = 8
    max_steps: int = 150
    max_pixels: int = 1024 * 1024
    max_prompt_chars: int = 2000


#: The largest LoRA scale a request may ask for.
MAX_LORA_SCALE = 10.0


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = Field(1.0, allow_inf_nan=False)


class JobRequest(BaseModel):
    """``POST /v1/jobs``. Fields left out take the model's defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | str | None = None
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    seed: int | None = Field(None, le=MAX_SEED)
    scheduler: str | None = None
    n: int = Field(1, ge=1)
    image: str | None = None
    mask_image: str | None = None
    strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    loras: list[LoraRequest] = []


def make_request(fields: dict[str, Any]) -> JobRequest:
    """A native request built by a compatibility layer; FieldError for the first bad field."""
    try:
        return JobRequest(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        raise FieldError(".".join(str(part) for part in first["loc"]), first["msg"]) from None


@contextmanager
def field_names(renames: dict[str, str]) -> Iterator[None]:
    """Errors naming native fields name the compatibility layer's field instead."""
    try:
        yield
    except FieldError as err:
        raise FieldError(renames.get(err.field, err.field), err.reason, err.status) from None


#: Request fields -> the pipeline call parameter a model must take for the field to mean anything.
_NEEDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "image": "image", "mask_image": "mask_image",
          "strength": "strength", "class_label": "class_labels", "guidance_scale": "guidance_scale"}


def choose_model(models: dict[str, ServedModel], name: str | None) -> ServedModel:
    """The served model of that name (the first one when None): names only, never paths."""
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise FieldError("model", f"unknown model {name!r}; served: {', '.join(models)}")
    return models[name]


def check_request(request: JobRequest, models: dict[str, ServedModel], limits: Limits,
                  inputs: Path) -> tuple[dict[str, Any], int]:
    """The job's stored parameters (model name, seed chosen, input images saved under ``inputs`` by
    hash) and its step count; FieldError naming the first field that cannot be used."""
    model = choose_model(models, request.model)
    _check_text(request, limits)
    given = request.model_dump(exclude_none=True, exclude_defaults=True)
    for name, parameter in _NEEDS.items():
        if name in given and parameter not in model.accepted:
            raise FieldError(name, f"model {model.name!r} ({type(model.pipe).__name__}) does not take {name}")
    for i, lora in enumerate(request.loras):
        if lora.name not in model.loras:
            served = ", ".join(sorted(model.loras)) or "none"
            raise FieldError(f"loras[{i}].name", f"unknown LoRA {lora.name!r} for model {model.name!r} (served: {served})")
        if abs(lora.scale) > MAX_LORA_SCALE:
            raise FieldError(f"loras[{i}].scale", f"{lora.scale}; at most {MAX_LORA_SCALE} in size")
    if len({lora.name for lora in request.loras}) != len(request.loras):
        raise FieldError("loras", "a LoRA is named twice")
    _check_numbers(request, model, limits)
    params = given | {"model": model.name, "n": request.n, "seed": _seed(request.seed)}
    if request.loras:
        params["loras"] = [lora.model_dump() for lora in request.loras]
    if request.class_label is not None:
        params["class_label"] = _class_label(request.class_label, model)
    if request.scheduler is not None:
        params["scheduler"] = _scheduler_name(request.scheduler)
    for name in ("image", "mask_image"):
        if name in params:
            params[name] = _save_png(name, params[name], inputs)
    if "mask_image" in params and "image" not in params:
        raise FieldError("mask_image", "needs image (the picture to inpaint)")
    return params, _steps(request, model)


def _check_text(request: JobRequest, limits: Limits) -> None:
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise FieldError(name, f"{len(text)} characters; at most {limits.max_prompt_chars}")


def _check_numbers(request: JobRequest, model: ServedModel, limits: Limits) -> None:
    if request.n > limits.max_n:
        raise FieldError("n", f"{request.n} images; at most {limits.max_n} per job")
    if request.steps is not None and request.steps > limits.max_steps:
        raise FieldError("steps", f"{request.steps}; at most {limits.max_steps}")
    if request.width and request.height and request.width * request.height > limits.max_pixels:
        raise FieldError("width", f"width x height = {request.width * request.height} pixels; at most "
                                  f"{limits.max_pixels}")
    size = model.fixed_size
    if size is not None and "image" not in model.accepted:
        for name, value, fixed in (("width", request.width, size[0]), ("height", request.height, size[1])):
            if value is not None and value != fixed:
                raise FieldError(name, f"model {model.name!r} makes {size[0]}x{size[1]} images only, got {value}")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and size is None and value % 8:
            raise FieldError(name, f"{value} is not a multiple of 8")


def _steps(request: JobRequest, model: ServedModel) -> int:
    steps = request.steps or model.default("num_inference_steps") or 1
    if request.image is None:
        return steps
    strength = request.strength if request.strength is not None else model.default("strength") or 1.0
    if int(steps * strength) < 1:
        raise FieldError("strength", f"steps {steps} x strength {strength} leaves no denoising step")
    return int(steps * strength)


def _seed(seed: int | None) -> int:
    return seed if seed is not None and seed >= 0 else secrets.randbelow(2**32)


def _class_label(label: int | str, model: ServedModel) -> int:
    classes = model.classes or []
    if isinstance(label, str) and label in classes:
        return classes.index(label)
    try:
        number = int(label)
    except ValueError:
        raise FieldError("class_label", f"{label!r} is not a class number or name; classes: "
                                        f"{', '.join(classes)}") from None
    if not 0 <= number < len(classes):
        raise FieldError("class_label", f"{number}: model {model.name!r} has classes 0 to {len(classes) - 1}")
    return number


def _scheduler_name(name: str) -> str:
    from ..schedulers.names import SAMPLER_NAMES, normalize_name

    if normalize_name(name) not in SAMPLER_NAMES:
        raise FieldError("scheduler", f"unknown scheduler {name!r}; GET /v1/schedulers lists them")
    return normalize_name(name)


def _save_png(name: str, data: str, inputs: Path) -> str:
    """Decode a base64 PNG, check it, keep it under ``inputs`` by its hash; the hash is stored."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != "PNG":
                raise FieldError(name, f"a {image.format} image; send a base64 PNG")
            image.verify()
    except (binascii.Error, UnidentifiedImageError, OSError, SyntaxError) as err:
        raise FieldError(name, f"not a base64 PNG ({err})") from None
    digest = hashlib.sha256(raw).hexdigest()
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / f"{digest}.png"
    if not path.exists():
        temporary = path.with_suffix(".part")
        temporary.write_bytes(raw)
        temporary.replace(path)
    return digest
