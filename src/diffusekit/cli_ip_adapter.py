"""``diffusekit generate --ip-adapter ADAPTER --ip-image REF.png [--ip-scale S] [--ip-image-encoder DIR]``.

ADAPTER is an IP-Adapter file, or a folder holding one weights file; the image encoder is the
``image_encoder`` folder beside it, the model's own, or ``--ip-image-encoder DIR``. The record
(``"ip_adapter"``: file, sha256, scale, image encoder, reference image) goes into every PNG, and
``--from`` replays it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .cli_metadata import CommandError, file_record

#: The scale when ``--ip-scale`` is not given (the reference's after ``load_ip_adapter``).
DEFAULT_IP_SCALE = 1.0


def add_ip_adapter_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--ip-adapter", metavar="ADAPTER",
                     help="an IP-Adapter file, or a folder with one weights file (image prompt; needs --ip-image)")
    gen.add_argument("--ip-image", metavar="REF.png", help="the image prompt of --ip-adapter")
    gen.add_argument("--ip-scale", type=float, metavar="SCALE",
                     help=f"weight of the image prompt (default: {DEFAULT_IP_SCALE})")
    gen.add_argument("--ip-image-encoder", metavar="DIR",
                     help="CLIP vision image encoder folder (default: image_encoder/ beside ADAPTER, or the model's)")


def check_ip_adapter_options(args: argparse.Namespace) -> None:
    """The checks that need no model (the image file itself is checked with ``--image``'s)."""
    adapter, image = getattr(args, "ip_adapter", None), getattr(args, "ip_image", None)
    if (adapter is None) != (image is None):
        raise CommandError("--ip-adapter and --ip-image go together (the adapter and its image prompt)")
    if adapter is None:
        for option in ("ip_scale", "ip_image_encoder"):
            if getattr(args, option, None) is not None:
                raise CommandError(f"--{option.replace('_', '-')} needs --ip-adapter")
        return
    scale = getattr(args, "ip_scale", None)
    if scale is not None and not math.isfinite(scale):
        raise CommandError(f"--ip-scale must be a finite number, got {scale}")
    for option, path in (("--ip-adapter", adapter), ("--ip-image-encoder", getattr(args, "ip_image_encoder", None))):
        if path is not None and not Path(path).exists():
            raise CommandError(f"{option} {path}: no such file or folder")


def _image_encoder(pipe, folder: str):
    from transformers import CLIPVisionModelWithProjection

    try:
        return CLIPVisionModelWithProjection.from_pretrained(folder, dtype=pipe.dtype).to(pipe.device)
    except (OSError, ValueError) as err:
        raise CommandError(f"--ip-image-encoder {folder}: not a CLIP vision model folder ({err})") from None


def load_ip_adapter_option(pipe, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``--ip-adapter`` into ``pipe`` at ``--ip-scale``; ``{"ip_adapter": record}`` (``{}`` without one)."""
    adapter = getattr(args, "ip_adapter", None)
    if adapter is None:
        return {}
    if not hasattr(pipe, "load_ip_adapter"):
        raise CommandError(f"--ip-adapter: {type(pipe).__name__} does not take IP-Adapters")
    from .loaders.ip_adapter import ip_adapter_path

    encoder = getattr(args, "ip_image_encoder", None)
    if encoder is not None:
        pipe.register_modules(image_encoder=_image_encoder(pipe, encoder))
    scale = DEFAULT_IP_SCALE if args.ip_scale is None else args.ip_scale
    try:
        path = ip_adapter_path(adapter, None, None)
        pipe.load_ip_adapter(path)
    except (OSError, ValueError) as err:  # WeightsError is a ValueError: it names the file and keys
        raise CommandError(f"--ip-adapter {adapter}: {err}") from None
    pipe.set_ip_adapter_scale(scale)
    encoder_record = str(Path(encoder).resolve()) if encoder is not None else None
    return {"ip_adapter": file_record(path, scale=scale, image_encoder=encoder_record,
                                      image=file_record(args.ip_image))}


def ip_adapter_call_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``{"ip_adapter_image": the --ip-image}`` for the pipeline call (``{}`` without one)."""
    image = getattr(args, "ip_image", None)
    if image is None:
        return {}
    from PIL import Image

    return {"ip_adapter_image": Image.open(image).convert("RGB")}


def apply_ip_adapter_record(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """``--from``: the recorded adapter, scale, encoder and image prompt, unless the command line gives an adapter."""
    entry = record.get("ip_adapter")
    if not entry or getattr(args, "ip_adapter", None) is not None:
        return
    args.ip_adapter, args.ip_image = entry["path"], entry["image"]["path"]
    if args.ip_scale is None:
        args.ip_scale = entry.get("scale")
    if args.ip_image_encoder is None:
        args.ip_image_encoder = entry.get("image_encoder")
