"""Generation parameters in PNG files: diffusekit's full JSON record and the A1111 ``parameters`` text.

The JSON record (text chunk ``diffusekit``) holds every resolved value of the run, enough for
``diffusekit generate --from IMAGE.png`` to redo the image; ``parameters`` is the one-paragraph
summary that A1111, ComfyUI and image browsers read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: PNG text-chunk key under which diffusekit stores its generation parameters (as JSON).
PNG_PARAMETERS_KEY = "diffusekit"
#: PNG text-chunk key of the A1111-style summary.
A1111_KEY = "parameters"

#: diffusekit sampler names -> the names A1111 shows.
A1111_SAMPLERS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS", "lms_karras": "LMS Karras",
    "dpm2": "DPM2", "dpm2_karras": "DPM2 Karras", "dpm2_a": "DPM2 a", "dpm2_a_karras": "DPM2 a Karras",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_2s_a_karras": "DPM++ 2S a Karras",
    "unipc": "UniPC", "ddim": "DDIM", "plms": "PLMS", "pndm": "PLMS", "lcm": "LCM", "deis": "DEIS",
}


class CommandError(ValueError):
    """A user error of the command line: printed as one ``error: ...`` line, exit status 2."""


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """``{"path": absolute path, "sha256": ..., **extra}`` of an input file."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_of(path), **extra}


def a1111_text(record: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, negative prompt, then ``Steps: N, Sampler: ..., ...``."""
    lines = [record.get("prompt") or ""]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    scheduler = record.get("scheduler") or {}
    sampler = A1111_SAMPLERS.get(scheduler.get("name") or _plain_name(scheduler.get("class")), scheduler.get("class"))
    size = f"{record['width']}x{record['height']}" if record.get("width") else None
    model = record.get("model")
    fields = [("Steps", record.get("steps")), ("Sampler", sampler), ("CFG scale", record.get("guidance")),
              ("Seed", record.get("image_seed")), ("Size", size), ("Model", Path(model).name if model else None),
              ("Class", record.get("class_label")), ("Denoising strength", record.get("strength")),
              *_controlnet_fields(record.get("controlnets") or []),
              ("IP-Adapter", _ip_adapter_text(record.get("ip_adapter"))),
              ("Version", f"diffusekit {record.get('diffusekit_version')}")]
    lines.append(", ".join(f"{key}: {value}" for key, value in fields if value is not None))
    return "\n".join(lines)


def _controlnet_fields(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A1111's ``ControlNet N: "Module: ..., Model: ..., Weight: ..., Guidance Start: ..., Guidance End: ..."``."""
    return [(f"ControlNet {i}", f'"Module: {e["preprocess"]}, Model: {Path(e["path"]).stem}, Weight: {e["scale"]}, '
                                f'Guidance Start: {e["start"]}, Guidance End: {e["end"]}"')
            for i, e in enumerate(entries)]


def _ip_adapter_text(entry: dict[str, Any] | None) -> str | None:
    """``IP-Adapter: NAME (SCALE)`` of a record's ``ip_adapter`` entry."""
    return f"{Path(entry['path']).stem} ({entry['scale']})" if entry else None


def _plain_name(class_name: str | None) -> str:
    """The sampler name of a scheduler class used with its plain settings (``DDIMScheduler`` -> ``ddim``)."""
    from .schedulers.names import SAMPLER_NAMES

    return next((name for name, entry in SAMPLER_NAMES.items()
                 if entry.class_name == class_name and not entry.overrides), "")


def save_png(image, path: Path, record: dict[str, Any]) -> Path:
    """Save a PIL image with ``record`` as JSON and as A1111 text in PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from .configuration import atomic_write

    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, json.dumps(record, sort_keys=True))
    info.add_text(A1111_KEY, a1111_text(record))
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))  # no half-written PNG


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters stored in a PNG: diffusekit's record, else its text chunks (may be empty).

    CommandError when the file is missing, is no PNG, or holds a diffusekit chunk that is not JSON.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            kind, text = image.format, dict(getattr(image, "text", {}) or {})
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise CommandError(f"{path}: not a readable image ({err})") from None
    if kind != "PNG":
        raise CommandError(f"{path}: a {kind} image; generation parameters are read from PNG files")
    if PNG_PARAMETERS_KEY not in text:
        return text
    try:
        record = json.loads(text[PNG_PARAMETERS_KEY])
    except json.JSONDecodeError as err:
        raise CommandError(f"{path}: the {PNG_PARAMETERS_KEY!r} text chunk is not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise CommandError(f"{path}: the {PNG_PARAMETERS_KEY!r} text chunk is not a JSON object")
    return record
