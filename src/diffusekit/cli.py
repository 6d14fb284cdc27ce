"""The ``diffusekit`` command line: generate, info, schedulers, demo, train."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

#: PNG text-chunk key under which generation parameters are stored (as JSON).
PNG_PARAMETERS_KEY = "diffusekit"


# -- output files --------------------------------------------------------------------------------

def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-1``, ``stem-2``... when taken: never overwrite a file."""
    path = folder / f"{stem}{suffix}"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def save_png(image, path: Path, parameters: dict[str, Any]) -> Path:
    """Save a PIL image with the generation parameters in a PNG text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    for key, value in parameters.items():
        if value is not None:
            info.add_text(key, str(value))
    image.save(path, pnginfo=info)
    return path


def read_png_parameters(path: Path) -> dict[str, Any]:
    """The generation parameters stored by :func:`save_png` (empty if none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if PNG_PARAMETERS_KEY in text:
        return json.loads(text[PNG_PARAMETERS_KEY])
    return text


# -- generate ------------------------------------------------------------------------------------

def _parse_lora(spec: str) -> tuple[str, float]:
    """``path.safetensors:0.8`` -> (path, 0.8); the scale defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def _choose_pipeline(pipe, args):
    """Pick the task from the inputs: a mask means inpainting, an image means image-to-image."""
    import diffusekit

    if args.image is None:
        return pipe
    name = "StableDiffusionInpaintPipeline" if args.mask else "StableDiffusionImg2ImgPipeline"
    task_cls = getattr(diffusekit, name)
    if isinstance(pipe, task_cls):
        return pipe
    params = inspect.signature(task_cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in params}
    return task_cls(**components)


def _call_arguments(pipe, args, generator) -> dict[str, Any]:
    """Map the command's options onto what this pipeline's ``__call__`` accepts."""
    from PIL import Image

    accepted = inspect.signature(pipe.__call__).parameters
    wanted: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.height,
        "width": args.width,
        "strength": args.strength,
        "generator": generator,
        "class_labels": [args.class_label] * args.batch if args.class_label is not None else None,
    }
    size = (args.width, args.height) if args.width and args.height else None
    if args.image is not None:
        wanted["image"] = Image.open(args.image).convert("RGB")
    if args.mask is not None:
        wanted["mask_image"] = Image.open(args.mask).convert("L")
    if size and "height" not in accepted:  # image-to-image: the size is the input image's, resized
        for key in ("image", "mask_image"):
            if key in wanted:
                wanted[key] = wanted[key].resize(size, Image.Resampling.LANCZOS)
        wanted["height"] = wanted["width"] = None
    if "batch_size" in accepted:
        wanted["batch_size"] = args.batch
    elif "num_images_per_prompt" in accepted:
        wanted["num_images_per_prompt"] = args.batch
    unused = [k for k, v in wanted.items() if v is not None and k not in accepted and k != "generator"]
    if unused:
        raise SystemExit(f"error: {type(pipe).__name__} does not take {', '.join(unused)}")
    return {k: v for k, v in wanted.items() if v is not None and k in accepted}


def load_pipeline(model: str | None, args):
    """The pipeline for ``model`` (a folder or Hub id), or the embedded digits model when None."""
    import torch

    import diffusekit

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if model is None:
        from .embedded import load_embedded_pipeline

        pipe = load_embedded_pipeline()
    else:
        pipe = diffusekit.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    if args.scheduler:
        from .schedulers.names import scheduler_from_name

        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    names, scales = [], []
    for spec in args.lora or []:
        path, scale = _parse_lora(spec)
        name = stem = Path(path).stem.replace(".", "_") or "lora"  # adapter names cannot hold "."
        copies = 0
        while name in names:  # files of the same name
            copies += 1
            name = f"{stem}_{copies}"
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except (OSError, ValueError) as err:  # WeightsError is a ValueError: it names the file and keys
            raise SystemExit(f"error: --lora {spec}: {err}") from None
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, scales)  # all of them, each with its scale
    for path in args.embedding or []:
        try:
            pipe.load_textual_inversion(path)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --embedding {path}: {err}") from None
    return pipe.to(args.device)


def command_generate(args) -> int:
    import torch

    pipe = _choose_pipeline(load_pipeline(args.model, args), args)
    pipe.set_progress_bar_config(desc="sampling", leave=False)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    kwargs = _call_arguments(pipe, args, generator)
    output = pipe(**kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parameters = {
        "model": args.model or "diffusekit:digits",
        "pipeline": type(pipe).__name__,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "scheduler": args.scheduler or type(pipe.scheduler).__name__,
        "guidance": args.guidance,
        "class_label": args.class_label,
    }
    written = []
    if hasattr(output, "audios"):
        from .pipelines.dance_diffusion import write_wav

        rate = pipe.unet.config.sample_rate
        for i, audio in enumerate(output.audios):
            written.append(write_wav(free_path(out, f"audio-{args.seed}-{i}", ".wav"), audio, rate))
    else:
        for i, image in enumerate(output.images):
            parameters["size"] = f"{image.width}x{image.height}"
            written.append(save_png(image, free_path(out, f"image-{args.seed}-{i}", ".png"), parameters))
        if args.grid and len(output.images) > 1:
            from PIL import Image

            from .pipelines.image_grid import make_image_grid

            images = list(output.images)
            cols = math.ceil(math.sqrt(len(images)))
            rows = math.ceil(len(images) / cols)
            images += [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))  # black cells
            written.append(save_png(make_image_grid(images, rows, cols), free_path(out, f"grid-{args.seed}", ".png"),
                                    parameters))
    for path in written:
        print(path)
    return 0


# -- info, schedulers, demo ----------------------------------------------------------------------

def command_info(args) -> int:
    target = Path(args.target)
    if target.suffix.lower() == ".png" and target.is_file():
        parameters = read_png_parameters(target)
        if not parameters:
            print(f"{target}: no generation parameters stored")
            return 1
        for key, value in parameters.items():
            print(f"{key}: {value}")
        return 0
    from .configuration import read_json
    from .hub import resolve_file

    index = read_json(resolve_file(args.target, "model_index.json"))
    print(f"pipeline: {index.get('_diffusekit_class_name') or index.get('_class_name')}")
    for name, entry in sorted(index.items()):
        if name.startswith("_"):
            continue
        if not isinstance(entry, list):
            print(f"  {name} = {entry}")
            continue
        print(f"  {name}: {entry[0]}.{entry[1]}" if entry[0] else f"  {name}: (none)")
        if entry[0] is None:
            continue
        for config_name in ("config.json", "scheduler_config.json"):
            try:
                config = read_json(resolve_file(args.target, config_name, subfolder=name))
            except (FileNotFoundError, OSError):
                continue
            for key, value in sorted(config.items()):
                if not key.startswith("_"):
                    print(f"      {key}: {json.dumps(value)}")
    return 0


def command_schedulers(args) -> int:
    from .schedulers.names import SAMPLER_NAMES

    width = max(len(name) for name in SAMPLER_NAMES)
    for name, entry in SAMPLER_NAMES.items():
        print(f"{name:<{width}}  {entry.description}")
    return 0


def command_demo(args) -> int:
    from .embedded import generate_demo_grid

    start = time.perf_counter()
    path = generate_demo_grid(Path(args.out), seed=args.seed)
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def command_convert(args) -> int:
    from .loaders.single_file import convert

    target = Path(args.output)
    if target.exists():
        raise SystemExit(f"error: {target} exists; choose a new path (nothing is overwritten)")
    path = convert(args.input, target, half=args.half, config=args.config, prediction_type=args.prediction_type,
                   extract_ema=False if args.no_ema else None)
    print(path)
    return 0


def command_train(args) -> int:
    from .training import run_train_command

    run_train_command(args)
    return 0


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusekit", description="Run and train diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images or audio with a pipeline")
    gen.add_argument("model", nargs="?", help="pipeline folder or Hub id (default: the embedded digits model)")
    gen.add_argument("--prompt")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--image", help="input image: image-to-image (or inpainting with --mask)")
    gen.add_argument("--mask", help="mask image for inpainting (white = repaint)")
    gen.add_argument("--strength", type=float)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--scheduler", help="a sampler name, see `diffusekit schedulers`")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--class-label", type=int, help="class to generate (class-conditional models)")
    gen.add_argument("--lora", action="append", metavar="PATH[:SCALE]")
    gen.add_argument("--embedding", action="append", metavar="PATH")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--grid", action="store_true", help="also write a grid of all images")
    gen.add_argument("--out", default="out")
    gen.set_defaults(func=command_generate)

    info = sub.add_parser("info", help="print a pipeline's components and configs, or a PNG's parameters")
    info.add_argument("target", help="pipeline folder, Hub id or generated PNG")
    info.set_defaults(func=command_info)

    sched = sub.add_parser("schedulers", help="list the sampler names that --scheduler takes")
    sched.set_defaults(func=command_schedulers)

    demo = sub.add_parser("demo", help="write a grid of digits from the embedded model")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=command_demo)

    conv = sub.add_parser("convert", help="single-file checkpoint <-> pipeline folder (SD 1.x/2.x)")
    conv.add_argument("input", help="a .safetensors/.ckpt file, or a pipeline folder")
    conv.add_argument("output", help="a folder (from a file), or a .safetensors/.ckpt file (from a folder)")
    conv.add_argument("--half", action="store_true", help="store float16 weights")
    conv.add_argument("--config", help="a pipeline folder whose configs and tokenizer to use")
    conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    conv.add_argument("--no-ema", action="store_true", help="ignore EMA weights in the file")
    conv.set_defaults(func=command_convert)

    train = sub.add_parser("train", help="train a UNet2DModel pipeline")
    from .training.config import add_train_arguments  # argparse only: no torch at parse time

    add_train_arguments(train)
    train.set_defaults(func=command_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
