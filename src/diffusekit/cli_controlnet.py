"""``diffusekit generate --controlnet NET --control-image IMAGE``: ControlNet options, their checks
(before any loading), the ControlNet pipeline of the task, call arguments, records and ``--from``.

Every option but ``--controlnet`` / ``--control-image`` (one each per net) takes one value for all
nets or one per net. Options are read with ``getattr`` so namespaces built elsewhere (the server's)
need not carry them.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any, Callable

from .cli_metadata import CommandError, file_record
from .hub import check_local

#: (family, task) -> the ControlNet pipeline of that task.
CONTROLNET_TASKS = {
    ("sd", "text"): "StableDiffusionControlNetPipeline", ("sd", "image"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "text"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "image"): "StableDiffusionXLControlNetImg2ImgPipeline",
}
#: Options that take one value for all nets or one per net, with their defaults.
PER_NET_OPTIONS = {"control_scale": 1.0, "control_preprocess": "none"}


def add_controlnet_arguments(gen: argparse.ArgumentParser) -> None:
    """The ControlNet options of ``diffusekit generate``."""
    gen.add_argument("--controlnet", action="append", metavar="NET",
                     help="a ControlNet folder, Hub id or single .safetensors file (an SD 1.x original-layout "
                          "file as it is, others with their config.json beside them); repeat for several nets")
    gen.add_argument("--control-image", action="append", metavar="IMAGE",
                     help="the control image of each --controlnet, in the same order")
    gen.add_argument("--control-scale", action="append", type=float, metavar="SCALE",
                     help="conditioning scale: once for all nets or once per net (default: 1)")
    gen.add_argument("--control-preprocess", action="append", metavar="NAME",
                     help="make the control image from the picture given: once for all or once per net "
                          "(canny: edges, thresholds 100/200; default none: the image as given)")
    gen.add_argument("--control-start", type=float, metavar="FRACTION",
                     help="fraction of the steps after which the nets start (default: 0)")
    gen.add_argument("--control-end", type=float, metavar="FRACTION",
                     help="fraction of the steps after which the nets stop (default: 1)")


def _nets(args: argparse.Namespace) -> list[str]:
    return getattr(args, "controlnet", None) or []


def per_net(args: argparse.Namespace, name: str) -> list:
    """The values of a per-net option, one per net (a single value repeated; the default when unset)."""
    values = getattr(args, name, None) or [PER_NET_OPTIONS[name]]
    return values * len(_nets(args)) if len(values) == 1 else list(values)


def _guidance_range(args: argparse.Namespace) -> tuple[float, float]:
    start, end = getattr(args, "control_start", None), getattr(args, "control_end", None)
    return (0.0 if start is None else start), (1.0 if end is None else end)


def check_controlnet_options(args: argparse.Namespace) -> None:
    """CommandError naming the option for counts that differ, values out of range and unreadable files."""
    nets = _nets(args)
    images = getattr(args, "control_image", None) or []
    if not nets:
        given = [f"--{n.replace('_', '-')}" for n in (*PER_NET_OPTIONS, "control_image", "control_start",
                                                       "control_end") if getattr(args, n, None) is not None]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise CommandError(f"{', '.join(given)} {verb} --controlnet (the net that reads the control image)")
        return
    if len(images) != len(nets):
        raise CommandError(f"--control-image is given {len(images)} times but --controlnet {len(nets)} times; "
                           "give one control image per ControlNet, in the same order")
    for name in PER_NET_OPTIONS:
        values = getattr(args, name, None) or []
        if len(values) not in (0, 1, len(nets)):
            raise CommandError(f"--{name.replace('_', '-')} is given {len(values)} times for {len(nets)} "
                               "ControlNets; give it once (for all) or once per --controlnet")
    _check_preprocessors(per_net(args, "control_preprocess"))
    start, end = _guidance_range(args)
    if not 0.0 <= start < end <= 1.0:
        raise CommandError(f"--control-start ({start}) and --control-end ({end}) must satisfy 0 <= start < end <= 1")
    for net in nets:
        if not Path(net).is_file():
            try:
                check_local(net)
            except FileNotFoundError as err:
                raise CommandError(f"--controlnet {err}") from None
    for path in images:
        _check_control_image(path)


def _check_preprocessors(names: list[str]) -> None:
    from .control_preprocess import PREPROCESSORS

    for name in names:
        if name not in PREPROCESSORS:
            raise CommandError(f"--control-preprocess {name}: unknown; choose one of {', '.join(sorted(PREPROCESSORS))}")


def _check_control_image(path: str) -> None:
    from .control_preprocess import load_control_image

    if not Path(path).is_file():
        raise CommandError(f"--control-image {path}: no such file")
    try:
        load_control_image(path)
    except OSError as err:
        raise CommandError(f"--control-image {err}") from None


def load_controlnet(net: str, dtype):
    """One ControlNet: a folder or Hub id, or a single file (original or diffusers layout) whose
    config is the ``config.json`` beside it, else the shipped one of its family (SD 1.x)."""
    from .models.controlnet import ControlNetModel

    try:
        if Path(net).is_file():
            beside = Path(net).parent
            config = beside if (beside / "config.json").is_file() else None
            return ControlNetModel.from_single_file(net, config=config, torch_dtype=dtype)
        return ControlNetModel.from_pretrained(net, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise CommandError(f"--controlnet {net}: {err}") from None


def _task(from_image: bool, inpainting: bool) -> str:
    return "inpaint" if inpainting else "image" if from_image else "text"


def controlnet_pipeline(pipe, args: argparse.Namespace, dtype) -> tuple[Any, list[dict]]:
    """The ControlNet pipeline of the model's family (SD or SDXL) and task (``--image``,
    ``--mask``) holding ``pipe``'s components and the nets; the nets' records."""
    import diffusekit

    from .pipelines.stable_diffusion_common import StableDiffusionBase
    from .pipelines.stable_diffusion_xl_common import StableDiffusionXLBase

    if not isinstance(pipe, StableDiffusionBase):
        raise CommandError(f"--controlnet: {type(pipe).__name__} is not a Stable Diffusion or SDXL pipeline")
    family = "sdxl" if isinstance(pipe, StableDiffusionXLBase) else "sd"
    task = _task(args.image is not None, args.mask is not None)
    if (family, task) not in CONTROLNET_TASKS:
        raise CommandError(f"--controlnet with --mask: there is no {family.upper()} ControlNet inpainting pipeline")
    task_cls = getattr(diffusekit, CONTROLNET_TASKS[family, task])
    nets = [load_controlnet(net, dtype) for net in _nets(args)]
    params = inspect.signature(task_cls.__init__).parameters
    options = {k: v for k, v in pipe.config.items() if k in params and not isinstance(v, (list, tuple))}
    components = {k: v for k, v in pipe.components.items() if k in params and k != "controlnet"}
    return task_cls(**options, **components, controlnet=nets[0] if len(nets) == 1 else nets), controlnet_records(args)


def control_images(args: argparse.Namespace) -> list:
    """The control images, each through its ``--control-preprocess``."""
    from .control_preprocess import preprocess

    return [preprocess(name, path) for name, path in zip(per_net(args, "control_preprocess"), args.control_image)]


def control_call_arguments(pipe, args: argparse.Namespace) -> dict[str, Any]:
    """The ControlNet arguments of the call (none without ``--controlnet``): the control image(s)
    under the name the pipeline takes them (``control_image`` beside an init image, else ``image``),
    the scale(s) and the guidance range."""
    if not _nets(args):
        return {}
    accepted = inspect.signature(pipe.__call__).parameters
    images, scales = control_images(args), per_net(args, "control_scale")
    single = len(images) == 1
    start, end = _guidance_range(args)
    return {"control_image" if "control_image" in accepted else "image": images[0] if single else images,
            "controlnet_conditioning_scale": scales[0] if single else scales,
            "control_guidance_start": start, "control_guidance_end": end}


def controlnet_records(args: argparse.Namespace) -> list[dict]:
    """What each net read, for the PNG record: the net, its control image (before preprocessing),
    the preprocessor, the scale and the guidance range."""
    start, end = _guidance_range(args)
    records = []
    for net, image, name, scale in zip(_nets(args), args.control_image, per_net(args, "control_preprocess"),
                                       per_net(args, "control_scale")):
        records.append({**_net_record(net), "image": file_record(image), "preprocess": name, "scale": scale,
                        "start": start, "end": end})
    return records


def _net_record(net: str) -> dict[str, Any]:
    """A file with its hash, a folder as an absolute path, a Hub id as given."""
    if Path(net).is_file():
        return file_record(net)
    return {"path": str(Path(net).resolve()) if Path(net).is_dir() else net}


def apply_controlnet_record(args: argparse.Namespace, record: dict,
                            warn_if_changed: Callable[[str, dict], None]) -> None:
    """``--from``: the record's nets, control images and settings when the command line gives no
    ``--controlnet`` (``warn_if_changed(option, file entry)`` for files whose hash differs)."""
    entries = record.get("controlnets") or []
    if _nets(args) or not entries:
        return
    for entry in entries:
        if "sha256" in entry:
            warn_if_changed("--controlnet", entry)
        warn_if_changed("--control-image", entry["image"])
    args.controlnet = [entry["path"] for entry in entries]
    args.control_image = [entry["image"]["path"] for entry in entries]
    for name, key in (("control_scale", "scale"), ("control_preprocess", "preprocess")):
        if getattr(args, name, None) is None:
            setattr(args, name, [entry[key] for entry in entries])
    for name, key in (("control_start", "start"), ("control_end", "end")):
        if getattr(args, name, None) is None:
            setattr(args, name, entries[0][key])
