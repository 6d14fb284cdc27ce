"""``diffusekit generate``: options checked before any loading, the run recorded in every PNG it writes,
and ``--from IMAGE.png`` to redo an image from that record."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from .cli_controlnet import (
    add_controlnet_arguments, apply_controlnet_record, check_controlnet_options, control_call_arguments,
    controlnet_pipeline,
)
from .cli_ip_adapter import (
    add_ip_adapter_arguments, apply_ip_adapter_record, check_ip_adapter_options, ip_adapter_call_arguments,
    load_ip_adapter_option,
)
from .cli_metadata import CommandError, file_record, read_png_parameters, save_png, sha256_of
from .cli_system import check_device, progress_bar_options, set_threads
from .hub import check_local
from .training.config import CLASS_LABELS_FILE

#: How the embedded models are named on the command line and in records: the digits model (class
#: labels, the default without a prompt) and the shapes model (text-to-image, the default with one).
EMBEDDED_MODEL = "diffusekit:digits"
EMBEDDED_TEXT_MODEL = "diffusekit:shapes"
EMBEDDED_PREFIX = "diffusekit:"
#: Record keys that ``--from`` copies onto options the command line leaves unset.
REPLAYED_OPTIONS = ("model", "prompt", "negative_prompt", "steps", "guidance", "strength", "height", "width",
                    "seed", "dtype", "refiner", "refiner_start", "prompt_weighting")
#: File endings of single-file checkpoints that ``generate`` loads as a whole pipeline.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: Where the SDXL refiner takes over from the base (``--refiner-start``), as a fraction of the schedule.
DEFAULT_REFINER_START = 0.8


# -- output files --------------------------------------------------------------------------------

def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-1``, ``stem-2``... when taken: never overwrite a file."""
    path = folder / f"{stem}{suffix}"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def check_out(out: str) -> Path:
    """The ``--out`` folder, checked (not created): CommandError when it is a file or cannot be written."""
    folder = Path(out)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")
    if not existing.is_dir():
        raise CommandError(f"--out {out}: cannot create the folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"--out {out}: {existing} is not writable")
    return folder


def make_out(out: str) -> Path:
    """Create the ``--out`` folder; CommandError naming it when that fails."""
    folder = check_out(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    return folder


# -- options -------------------------------------------------------------------------------------

def _check_image_file(option: str, path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise CommandError(f"{option} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CommandError(f"{option} {path}: not a readable image ({err})") from None


def embedded_name(model: str | None) -> str | None:
    """``"digits"`` for ``diffusekit:digits`` and so on; None for other models. CommandError for an
    unknown ``diffusekit:`` name."""
    if model is None or not model.startswith(EMBEDDED_PREFIX):
        return None
    from .embedded import EMBEDDED_MODELS

    name = model[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise CommandError(f"model {model}: no such embedded model; there are "
                           + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS))
    return name


def choose_model(args: argparse.Namespace) -> None:
    """Fill in ``args.model``: ``generate "a red circle"`` (a MODEL with a space that is no file) is a
    prompt; with no model, a prompt picks the embedded text-to-image model and none the digits."""
    model = args.model
    if model is not None and args.prompt is None and " " in model and not Path(model).expanduser().exists():
        args.prompt, args.model = model, None
    if args.model is None:
        args.model = EMBEDDED_TEXT_MODEL if args.prompt is not None else EMBEDDED_MODEL


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Fill unset ``--steps/--guidance/--scheduler`` from the model folder's ``diffusekit_defaults.json``."""
    name = embedded_name(args.model)
    if name is not None:
        from .embedded import embedded_model_path

        folder = embedded_model_path(name)
    elif args.model is not None and Path(args.model).expanduser().is_dir():
        folder = Path(args.model).expanduser()
    else:
        return
    from .embedded import generation_defaults

    try:
        defaults = generation_defaults(folder)
    except ValueError as err:
        raise CommandError(str(err)) from None
    for key, value in defaults.items():
        if getattr(args, key, None) is None and not (key == "scheduler" and getattr(args, "scheduler_record", None)):
            setattr(args, key, value)


def check_options(args: argparse.Namespace) -> None:
    """Every check that needs no model, so mistakes fail before anything loads."""
    choose_model(args)
    apply_model_defaults(args)
    _check_numbers(args)
    _check_files(args)
    check_controlnet_options(args)
    check_ip_adapter_options(args)
    if args.scheduler is not None:
        from .schedulers.names import SAMPLER_NAMES, normalize_name

        if normalize_name(args.scheduler) not in SAMPLER_NAMES:
            raise CommandError(f"--scheduler {args.scheduler}: unknown name; `diffusekit schedulers` lists them")


def _check_numbers(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps must be at least 1, got {args.steps}")
    if args.batch is not None and args.batch < 1:
        raise CommandError(f"--batch must be at least 1, got {args.batch}")
    for name in ("guidance", "strength"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CommandError(f"--{name} must be a finite number, got {value}")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise CommandError(f"--strength must lie in [0, 1], got {args.strength}")
    if args.refiner_start is not None:
        if args.refiner is None:
            raise CommandError("--refiner-start needs --refiner (the model that finishes the image)")
        if not 0.0 < args.refiner_start < 1.0:
            raise CommandError(f"--refiner-start must lie strictly between 0 and 1, got {args.refiner_start}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name} must be at least 1, got {value}")


def _check_files(args: argparse.Namespace) -> None:
    if args.mask is not None and args.image is None:
        raise CommandError("--mask needs --image (the picture to inpaint)")
    images = (("--image", args.image), ("--mask", args.mask), ("--ip-image", getattr(args, "ip_image", None)))
    for option, path in images:
        if path is not None:
            _check_image_file(option, path)
    if embedded_name(args.model) is None:
        check_local(args.model)
    if args.refiner is not None:
        try:
            check_local(args.refiner)
        except FileNotFoundError as err:
            raise CommandError(f"--refiner {err}") from None
    for option, paths in (("--lora", [_parse_lora(spec)[0] for spec in args.lora or []]),
                          ("--embedding", args.embedding or [])):
        for path in paths:
            try:
                check_local(path)
            except FileNotFoundError as err:
                raise CommandError(f"{option} {err}") from None
    check_out(args.out)


def _warn_if_changed(option: str, entry: dict) -> None:
    path = Path(entry["path"])
    if path.is_file() and sha256_of(path) != entry.get("sha256"):
        print(f"warning: {option} {path} changed since the image was made (sha256 differs)", file=sys.stderr)


def _replayed_files(option: str, entries: list[dict] | None) -> list[dict]:
    for entry in entries or []:
        _warn_if_changed(option, entry)
    return entries or []


def apply_record(args: argparse.Namespace, source: str) -> None:
    """Fill the options left unset from the record in ``source`` (``--from``): the same image again."""
    record = read_png_parameters(source)
    if "diffusekit_version" not in record:
        raise CommandError(f"--from {source}: no diffusekit generation parameters stored in it")
    if "grid" in record:
        raise CommandError(f"--from {source}: a grid of several images; pass one of the images")
    for name in REPLAYED_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, record.get(name))
    for option, name in (("--image", "image"), ("--mask", "mask")):
        if getattr(args, name) is None and record.get(name):
            _warn_if_changed(option, record[name])
            setattr(args, name, record[name]["path"])
    if args.lora is None:
        args.lora = [f"{e['path']}:{e['scale']}" for e in _replayed_files("--lora", record.get("loras"))]
    if args.embedding is None:
        args.embedding = [e["path"] for e in _replayed_files("--embedding", record.get("embeddings"))]
    apply_controlnet_record(args, record, _warn_if_changed)
    apply_ip_adapter_record(args, record)
    if args.scheduler is None:
        args.scheduler_record = record.get("scheduler")
    if args.batch is None and args.class_label is None:  # the same call, keeping only that image
        args.batch, args.class_labels, args.only_index = record["batch"], record.get("class_labels"), record["index"]


# -- the pipeline ----------------------------------------------------------------------------------

def _parse_lora(spec: str) -> tuple[str, float]:
    """``path.safetensors:0.8`` -> (path, 0.8); the scale defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def _load_loras(pipe, specs: list[str]) -> list[dict]:
    """Load every ``--lora PATH[:SCALE]``, all active with their scales; their records."""
    if specs and not hasattr(pipe, "load_lora_weights"):
        raise CommandError(f"--lora: {type(pipe).__name__} does not take LoRAs")
    names, scales, records = [], [], []
    for spec in specs:
        path, scale = _parse_lora(spec)
        name = stem = Path(path).stem.replace(".", "_") or "lora"  # adapter names cannot hold "."
        copies = 0
        while name in names:  # files of the same name
            copies += 1
            name = f"{stem}_{copies}"
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except (OSError, ValueError) as err:  # WeightsError is a ValueError: it names the file and keys
            raise CommandError(f"--lora {spec}: {err}") from None
        names.append(name)
        scales.append(scale)
        records.append(file_record(path, scale=scale) if Path(path).is_file() else {"path": path, "scale": scale})
    if names:
        pipe.set_adapters(names, scales)
    return records


def _load_embeddings(pipe, paths: list[str]) -> list[dict]:
    if paths and not hasattr(pipe, "load_textual_inversion"):
        raise CommandError(f"--embedding: {type(pipe).__name__} does not take textual inversion embeddings")
    records = []
    for path in paths:
        try:
            pipe.load_textual_inversion(path)
        except (OSError, ValueError) as err:
            raise CommandError(f"--embedding {path}: {err}") from None
        records.append(file_record(path) if Path(path).is_file() else {"path": path})
    return records


def _scheduler(pipe, args: argparse.Namespace):
    """The scheduler ``--scheduler`` names, the one a ``--from`` record holds, or the pipeline's own."""
    import diffusekit

    if args.scheduler:
        from .schedulers.names import scheduler_from_name

        return scheduler_from_name(args.scheduler, pipe.scheduler.config)
    recorded = getattr(args, "scheduler_record", None)
    if recorded:
        return getattr(diffusekit, recorded["class"]).from_config(recorded["config"])
    return pipe.scheduler


def load_pipeline(args: argparse.Namespace, device) -> tuple[Any, dict[str, Any]]:
    """The pipeline (scheduler, LoRAs, embeddings applied) on ``device``, and the record of what was loaded."""
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    name = embedded_name(args.model) or ("digits" if args.model is None else None)
    if name is not None:
        from .embedded import load_embedded_pipeline

        pipe = load_embedded_pipeline(name)
        if dtype is not None:
            pipe.to(dtype=dtype)
    else:
        pipe = open_pipeline(args.model, dtype, getattr(args, "config", None))
    pipe.scheduler = _scheduler(pipe, args)
    loaded = {"loras": _load_loras(pipe, args.lora or []), "embeddings": _load_embeddings(pipe, args.embedding or [])}
    if getattr(args, "controlnet", None):
        pipe, loaded["controlnets"] = controlnet_pipeline(pipe, args, dtype)
    else:
        pipe = _choose_task(pipe, args.image is not None, args.mask is not None)
    loaded.update(load_ip_adapter_option(pipe, args))
    return pipe.to(device), loaded


def open_pipeline(model: str, dtype=None, config: str | None = None):
    """A pipeline from a folder or Hub id, or from one original-layout checkpoint file (the family
    read from its keys: SD 1.x/2.x, SDXL base or refiner; ``config``: a folder with the component
    configs, default the shipped ones)."""
    import diffusekit

    if Path(model).suffix in SINGLE_FILE_SUFFIXES and Path(model).is_file():
        from .loaders.single_file import pipeline_from_single_file

        return pipeline_from_single_file(model, torch_dtype=dtype, config=config)
    if config is not None:
        raise CommandError("--config is for single-file models (.safetensors/.ckpt); a folder has its own configs")
    return diffusekit.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)


def load_refiner(args: argparse.Namespace, base, device):
    """The ``--refiner`` pipeline for the task (image-to-image, or inpainting with ``--mask``), or None."""
    if args.refiner is None:
        return None
    import torch

    from .pipelines.stable_diffusion_xl_common import StableDiffusionXLBase

    if not isinstance(base, StableDiffusionXLBase):
        raise CommandError(f"--refiner: {type(base).__name__} is not an SDXL pipeline; the refiner takes over "
                           "SDXL latents only")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    refiner = open_pipeline(args.refiner, dtype)
    if not isinstance(refiner, StableDiffusionXLBase):
        raise CommandError(f"--refiner {args.refiner}: {type(refiner).__name__} is not an SDXL pipeline")
    return _choose_task(refiner, True, args.mask is not None).to(device)


_TASKS = {  # (family, inpainting) -> the pipeline class of the task
    ("sd", False): "StableDiffusionImg2ImgPipeline", ("sd", True): "StableDiffusionInpaintPipeline",
    ("sdxl", False): "StableDiffusionXLImg2ImgPipeline", ("sdxl", True): "StableDiffusionXLInpaintPipeline",
}


def _choose_task(pipe, from_image: bool, inpainting: bool):
    """Pick the task from the inputs: a mask means inpainting, an image means image-to-image. The
    task's pipeline takes the components and the pipeline options (``requires_aesthetics_score``...)."""
    import diffusekit

    from .pipelines.stable_diffusion_xl_common import StableDiffusionXLBase

    if not from_image:
        return pipe
    family = "sdxl" if isinstance(pipe, StableDiffusionXLBase) else "sd"
    task_cls = getattr(diffusekit, _TASKS[family, inpainting])
    if isinstance(pipe, task_cls):
        return pipe
    params = inspect.signature(task_cls.__init__).parameters
    options = {k: v for k, v in pipe.config.items() if k in params and not isinstance(v, (list, tuple))}
    components = {k: v for k, v in pipe.components.items() if k in params}
    return task_cls(**options, **components)


def model_record(model: str | None) -> str:
    """The model as recorded: the embedded name, an absolute folder, or the Hub id as given."""
    if model is None:
        return EMBEDDED_MODEL
    if embedded_name(model) is not None:
        return model
    return str(Path(model).resolve()) if Path(model).expanduser().is_dir() else model


def class_names(model: str | None) -> list[str] | None:
    """The class names saved with a local class-conditional model (``class_labels.json``), if any."""
    if model is None or embedded_name(model) is not None:
        from .embedded import embedded_model_path

        folder = embedded_model_path(embedded_name(model) or "digits")
    else:
        folder = Path(model).expanduser()
    path = folder / CLASS_LABELS_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CommandError(f"{path}: cannot read the class names ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CommandError(f"{path}: expected a JSON list of class names")
    return names


def class_labels(pipe, args: argparse.Namespace) -> list[int] | None:
    """The label of each image: ``--class-label`` (a number or a class name) ``--batch`` times, else
    every class ``--batch`` times; None for pipelines without classes."""
    if "class_labels" not in inspect.signature(pipe.__call__).parameters:
        if args.class_label is not None:
            raise CommandError(f"--class-label: {type(pipe).__name__} is not class-conditional")
        return None
    if getattr(args, "class_labels", None):
        return list(args.class_labels)
    count = pipe.unet.config.num_class_embeds - 1
    batch = args.batch or 1
    if args.class_label is None:
        return [label for label in range(count) for _ in range(batch)]
    names = class_names(args.model) or []
    if args.class_label in names:
        label = names.index(args.class_label)
    else:
        try:
            label = int(args.class_label)
        except ValueError:
            known = f"; classes: {', '.join(names)}" if names else ""
            raise CommandError(f"--class-label {args.class_label}: not a class number or name{known}") from None
    if not 0 <= label < count:
        raise CommandError(f"--class-label {args.class_label}: the model has classes 0 to {count - 1}")
    return [label] * batch


def _defaults(pipe) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_fixed_size(pipe, args: argparse.Namespace) -> None:
    """Pipelines without height/width make the model's size only: other sizes are refused."""
    size = getattr(pipe.unet.config, "sample_size", None)
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    given = (args.height or sizes[0], args.width or sizes[1])
    if given != sizes:
        raise CommandError(f"--height/--width: {type(pipe).__name__} makes {sizes[1]}x{sizes[0]} images only "
                           f"(the model's size), got {given[1]}x{given[0]}")


def call_arguments(pipe, args: argparse.Namespace, labels: list[int] | None, generators) -> dict[str, Any]:
    """Map the options onto what this pipeline's ``__call__`` accepts; CommandError for the ones it does not."""
    from PIL import Image

    accepted = inspect.signature(pipe.__call__).parameters
    count = len(labels) if labels else args.batch or 1
    wanted: dict[str, Any] = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps,
        "guidance_scale": args.guidance, "strength": args.strength, "class_labels": labels,
        "height": args.height, "width": args.width, "prompt_weighting": getattr(args, "prompt_weighting", None),
    }
    if args.image is not None:
        wanted["image"] = Image.open(args.image).convert("RGB")
    if args.mask is not None:
        wanted["mask_image"] = Image.open(args.mask).convert("L")
    wanted.update(ip_adapter_call_arguments(args))
    if "height" not in accepted:
        if args.image is None:
            _check_fixed_size(pipe, args)
        elif args.height and args.width:  # image-to-image: the size is the input image's, resized
            for key in ("image", "mask_image"):
                if key in wanted:
                    wanted[key] = wanted[key].resize((args.width, args.height), Image.Resampling.LANCZOS)
        wanted["height"] = wanted["width"] = None
    if "batch_size" in accepted and labels is None:
        wanted["batch_size"] = count
    elif "num_images_per_prompt" in accepted:
        wanted["num_images_per_prompt"] = count
    wanted.update(control_call_arguments(pipe, args))
    unused = [k for k, v in wanted.items() if v is not None and k not in accepted]
    if unused:
        raise CommandError(f"{type(pipe).__name__} does not take {', '.join(unused)}")
    return {"generator": generators, **{k: v for k, v in wanted.items() if v is not None}}


# -- the command -----------------------------------------------------------------------------------

def resolved_values(pipe, args: argparse.Namespace, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The values the call will use, pipeline defaults filled in; CommandError when image-to-image
    would be left with no denoising step."""
    defaults = _defaults(pipe)
    value = lambda name: kwargs.get(name, defaults.get(name))  # noqa: E731
    resolved = {"steps": value("num_inference_steps"), "guidance": value("guidance_scale"),
                "strength": value("strength") if args.image is not None else None}
    if resolved["strength"] is not None and resolved["steps"] and int(resolved["steps"] * resolved["strength"]) < 1:
        raise CommandError(f"--steps {resolved['steps']} with --strength {resolved['strength']} leaves no denoising "
                           "step (steps x strength must be at least 1)")
    return resolved


def _base_record(pipe, args: argparse.Namespace, loaded: dict, seed: int, count: int) -> dict[str, Any]:
    from . import __version__

    return {
        "diffusekit_version": __version__, "model": model_record(args.model), "pipeline": type(pipe).__name__,
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, "batch": count,
        "prompt_weighting": getattr(args, "prompt_weighting", None),
        "scheduler": {"name": args.scheduler or (getattr(args, "scheduler_record", None) or {}).get("name"),
                      "class": type(pipe.scheduler).__name__,
                      "config": json.loads(pipe.scheduler.to_json_string())},
        "image": file_record(args.image) if args.image else None,
        "mask": file_record(args.mask) if args.mask else None,
        "dtype": str(pipe.dtype).removeprefix("torch."), "device": str(pipe.device), **loaded,
        "refiner": model_record(args.refiner) if args.refiner else None,
        "refiner_start": _refiner_start(args) if args.refiner else None,
    }


def _refiner_start(args: argparse.Namespace) -> float:
    return DEFAULT_REFINER_START if args.refiner_start is None else args.refiner_start


def run_with_refiner(pipe, refiner, args: argparse.Namespace, kwargs: dict[str, Any], generators):
    """The base up to ``--refiner-start`` of the schedule (latents out), then the refiner from there."""
    start = _refiner_start(args)
    latents = pipe(**kwargs, denoising_end=start, output_type="latent").images
    accepted = inspect.signature(refiner.__call__).parameters
    refined = {k: v for k, v in kwargs.items() if k in accepted and k not in ("image", "strength", "generator")}
    return refiner(**refined, image=latents, denoising_start=start, generator=generators)


def _write_images(images, out: Path, record: dict, labels, names, keep, grid: bool) -> list[Path]:
    written = []
    for index, image in enumerate(images):
        if keep is not None and index != keep:
            continue
        label = labels[index] if labels else None
        entry = dict(record, index=index, image_seed=record["seed"] + index, width=image.width, height=image.height,
                     class_label=label, class_labels=labels,
                     class_name=names[label] if names and label is not None and label < len(names) else None)
        written.append(save_png(image, free_path(out, f"{record['seed']}-{index}", ".png"), entry))
    if grid and len(images) > 1 and keep is None:
        written.append(_write_grid(images, out, record, labels))
    return written


def _write_grid(images, out: Path, record: dict, labels) -> Path:
    from PIL import Image

    from .pipelines.image_grid import make_image_grid

    images = list(images)
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    images += [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))  # black cells
    entry = dict(record, grid={"rows": rows, "cols": cols}, class_labels=labels,
                 image_seeds=[record["seed"] + i for i in range(record["batch"])])
    return save_png(make_image_grid(images, rows, cols), free_path(out, f"{record['seed']}-grid", ".png"), entry)


def generate_files(pipe, args: argparse.Namespace, loaded: dict, refiner=None, **call_options) -> list[Path]:
    """Call ``pipe`` as ``generate`` does (labels, seeds ``seed + i``, options; then ``refiner`` on its
    latents when given) and write its files, with their records, into ``args.out``; ``call_options``
    go to the call as they are (a step callback)."""
    import torch

    labels = class_labels(pipe, args)
    seed = args.seed if args.seed is not None and args.seed >= 0 else secrets.randbelow(2**32)
    count = len(labels) if labels else args.batch or 1
    def seeded():  # image i: seed + i (the refiner gets generators of the same seeds)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
        return generators[0] if count == 1 else generators

    kwargs = call_arguments(pipe, args, labels, seeded())
    resolved = resolved_values(pipe, args, kwargs)
    if refiner is None:
        output = pipe(**kwargs, **call_options)
    else:
        output = run_with_refiner(pipe, refiner, args, {**kwargs, **call_options}, seeded())
    record = {**_base_record(pipe, args, loaded, seed, count), **resolved}
    out = make_out(args.out)
    if hasattr(output, "audios"):
        from .pipelines.dance_diffusion import write_wav

        rate = pipe.unet.config.sample_rate
        return [write_wav(free_path(out, f"{seed}-{i}", ".wav"), audio, rate) for i, audio in enumerate(output.audios)]
    return _write_images(output.images, out, record, labels, class_names(args.model) if labels else None,
                         getattr(args, "only_index", None), getattr(args, "grid", False))


def command_generate(args: argparse.Namespace) -> int:
    """Run ``diffusekit generate``; print each file written."""
    if args.from_image:
        apply_record(args, args.from_image)
    check_options(args)
    set_threads(args.threads)
    device = check_device(args.device)
    pipe, loaded = load_pipeline(args, device)
    refiner = load_refiner(args, pipe, device)
    for stage in (pipe, refiner):
        if stage is not None:
            stage.set_progress_bar_config(**progress_bar_options("sampling"))
    for path in generate_files(pipe, args, loaded, refiner):
        print(path)
    return 0


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """The ``diffusekit generate`` options; unset ones stay None (pipeline defaults, or ``--from``'s record)."""
    gen.add_argument("model", nargs="?",
                     help=f"pipeline folder or Hub id (default: with a prompt the embedded text-to-image model "
                          f"{EMBEDDED_TEXT_MODEL}, else the digits model {EMBEDDED_MODEL}); a MODEL with spaces "
                          "that is no file is taken as the prompt: generate \"a red circle at the top\"")
    gen.add_argument("--config", metavar="DIR",
                     help="for a single-file MODEL: a pipeline folder whose component configs to use "
                          "(default: the shipped configs of the detected family)")
    gen.add_argument("--from", dest="from_image", metavar="IMAGE.png",
                     help="redo an image from the parameters stored in it; options given here override them")
    gen.add_argument("--prompt")
    gen.add_argument("--prompts", metavar="FILE.txt|FILE.jsonl",
                     help="one image per line (seed = --seed + line number, file LINE.png, manifest.jsonl); "
                          "under `accelerate launch` the lines are split across processes")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--prompt-weighting", choices=["a1111"],
                     help="a1111: (word:1.3) and [word] attention weights, and prompts past 77 tokens")
    gen.add_argument("--image", help="input image: image-to-image (or inpainting with --mask)")
    gen.add_argument("--mask", help="mask image for inpainting (white = repaint)")
    gen.add_argument("--strength", type=float, help="image-to-image strength in [0, 1] (default: the pipeline's)")
    gen.add_argument("--refiner", metavar="MODEL", help="an SDXL refiner (folder or Hub id) that finishes the image")
    gen.add_argument("--refiner-start", type=float, metavar="FRACTION",
                     help=f"where the refiner takes over, in (0, 1) (default: {DEFAULT_REFINER_START})")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    gen.add_argument("--height", type=int, help="default: the model's size")
    gen.add_argument("--width", type=int, help="default: the model's size")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    gen.add_argument("--scheduler", help="a sampler name, see `diffusekit schedulers` (default: the model's)")
    gen.add_argument("--seed", type=int, help="image i uses seed + i (default, or negative: a random seed, recorded)")
    gen.add_argument("--batch", type=int, help="images (class-conditional: per class) (default: 1)")
    gen.add_argument("--class-label", help="class number or name (default: one image per class)")
    gen.add_argument("--lora", action="append", metavar="PATH[:SCALE]", help="a LoRA file, scale 1 if not given")
    gen.add_argument("--embedding", action="append", metavar="PATH", help="a textual inversion embedding")
    add_ip_adapter_arguments(gen)
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps...")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the model's")
    gen.add_argument("--grid", action="store_true", help="also write a grid of all images")
    gen.add_argument("--out", default="out", help="output folder; files are named SEED-INDEX.png")
    add_controlnet_arguments(gen)
