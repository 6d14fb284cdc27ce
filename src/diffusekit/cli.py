"""The ``diffusekit`` command line: generate, info, schedulers, demo, convert, train, serve.

User errors (bad options, missing files, unreadable inputs) print one ``error: ...`` line and exit
with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli_metadata import PNG_PARAMETERS_KEY, CommandError, read_png_parameters, save_png

__all__ = ["PNG_PARAMETERS_KEY", "build_parser", "main", "read_png_parameters", "save_png"]

#: Exceptions that mean the user asked for something that cannot work (status 2, no traceback).
USER_ERRORS = (ValueError, OSError, ImportError)
USAGE_STATUS, BUG_STATUS, INTERRUPTED_STATUS, BROKEN_PIPE_STATUS = 2, 1, 130, 141


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options that have a real default (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# -- info, schedulers, demo, convert, train --------------------------------------------------------

def _print_png_parameters(target: Path) -> int:
    parameters = read_png_parameters(target)
    if not parameters:
        print(f"{target}: no generation parameters stored", file=sys.stderr)
        return 1
    for key, value in parameters.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _print_component_configs(target: str, name: str) -> None:
    from .configuration import read_json
    from .hub import resolve_file

    for config_name in ("config.json", "scheduler_config.json"):
        try:
            config = read_json(resolve_file(target, config_name, subfolder=name))
        except OSError:
            continue
        for key, value in sorted(config.items()):
            if not key.startswith("_"):
                print(f"      {key}: {json.dumps(value)}")


def command_info(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_file():
        return _print_png_parameters(target)
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
        if entry[0] is not None:
            _print_component_configs(args.target, name)
    return 0


def command_schedulers(args: argparse.Namespace) -> int:
    from .schedulers.names import SAMPLER_NAMES

    width = max(len(name) for name in SAMPLER_NAMES)
    for name, entry in SAMPLER_NAMES.items():
        print(f"{name:<{width}}  {entry.description}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from . import __version__
    from .cli_generate import EMBEDDED_MODEL, EMBEDDED_TEXT_MODEL, check_out
    from .cli_system import set_threads
    from .configuration import read_json
    from .embedded import (DEMO_GUIDANCE_SCALE, DEMO_STEPS, SHAPES_DEMO_PROMPTS, embedded_model_path,
                           generate_demo_grid, generate_shapes_grid)

    check_out(args.out)
    set_threads(args.threads)
    start = time.perf_counter()
    path = generate_demo_grid(Path(args.out), seed=args.seed)
    scheduler = read_json(embedded_model_path() / "scheduler" / "scheduler_config.json")
    record = {"diffusekit_version": __version__, "model": EMBEDDED_MODEL, "pipeline": "ClassConditionalPipeline",
              "seed": args.seed, "steps": DEMO_STEPS, "guidance": DEMO_GUIDANCE_SCALE,
              "class_labels": [d for d in range(10) for _ in range(8)], "grid": {"rows": 10, "cols": 8},
              "scheduler": {"name": None, "class": scheduler["_class_name"], "config": scheduler}}
    _add_record(path, record)
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    path = generate_shapes_grid(Path(args.out), seed=args.seed)
    scheduler = read_json(embedded_model_path("shapes") / "scheduler" / "scheduler_config.json")
    _add_record(path, {"diffusekit_version": __version__, "model": EMBEDDED_TEXT_MODEL,
                       "pipeline": "StableDiffusionPipeline", "seed": args.seed, "prompts": list(SHAPES_DEMO_PROMPTS),
                       "grid": {"rows": len(SHAPES_DEMO_PROMPTS), "cols": 8},
                       "scheduler": {"name": None, "class": scheduler["_class_name"], "config": scheduler}})
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _add_record(path: Path, record: dict) -> None:
    """Store the generation record in the PNG at ``path``."""
    from PIL import Image

    with Image.open(path) as grid:
        grid.load()
    save_png(grid, path, record)


def command_generate(args: argparse.Namespace) -> int:
    """``generate``: one run, or with ``--prompts`` one image per line of a file."""
    if args.ray and not args.prompts:
        raise CommandError("--ray runs a --prompts file; give --prompts FILE")
    if args.ray:
        from .batch_ray import command_batch_ray

        return command_batch_ray(args)
    if args.prompts:
        from .cli_batch import command_batch

        return command_batch(args)
    from .cli_generate import command_generate as generate

    return generate(args)


def command_convert(args: argparse.Namespace) -> int:
    from .loaders.single_file import convert

    target = Path(args.output)
    if target.exists():
        raise CommandError(f"{target} exists; choose a new path (nothing is overwritten)")
    path = convert(args.input, target, half=args.half, config=args.config, prediction_type=args.prediction_type,
                   extract_ema=False if args.no_ema else None)
    print(path)
    return 0


def command_train(args: argparse.Namespace) -> int:
    from .cli_system import set_threads
    from .training import run_train_command

    set_threads(args.threads)
    run_train_command(args)
    return 0


def command_serve(args: argparse.Namespace) -> int:
    if args.ray:
        from .serving.ray_serve import command_serve_ray

        return command_serve_ray(args)
    from .serving.server import command_serve as serve

    return serve(args)


# -- parser ----------------------------------------------------------------------------------------

def _version() -> str:
    from . import __version__

    return f"diffusekit {__version__}"


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """``--debug`` and ``--threads``, taken before or after the command (SUPPRESS keeps the first)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="show the full traceback of an error")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS if suppress else None,
                        help="torch CPU threads (default: physical cores, at most 8, less the ones busy)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusekit", description="Run and train diffusion models.",
                                     formatter_class=HelpFormatter, parents=[_common_options(False)])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    common = [_common_options(True)]

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        sub_parser = sub.add_parser(name, help=help, description=help, parents=common, formatter_class=HelpFormatter)
        sub_parser.set_defaults(func=func)
        return sub_parser

    from .cli_batch import add_ray_arguments
    from .cli_generate import add_generate_arguments

    generate = command("generate", "generate images or audio with a pipeline", command_generate)
    add_generate_arguments(generate)
    add_ray_arguments(generate)

    info = command("info", "print a pipeline's components and configs, or a PNG's parameters", command_info)
    info.add_argument("target", help="pipeline folder, Hub id or generated PNG")

    command("schedulers", "list the sampler names that --scheduler takes", command_schedulers)

    demo = command("demo", "write grids of digits and of shapes from the embedded models", command_demo)
    demo.add_argument("--out", default="demo-output", help="output folder")
    demo.add_argument("--seed", type=int, default=0)

    conv = command("convert", "single-file checkpoint <-> pipeline folder (SD 1.x/2.x, SDXL base/refiner)",
                   command_convert)
    conv.add_argument("input", help="a .safetensors/.ckpt file, or a pipeline folder")
    conv.add_argument("output", help="a folder (from a file), or a .safetensors/.ckpt file (from a folder)")
    conv.add_argument("--half", action="store_true", help="store float16 weights")
    conv.add_argument("--config", help="a pipeline folder whose configs and tokenizer to use")
    conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    conv.add_argument("--no-ema", action="store_true", help="ignore EMA weights in the file")

    from .training.config import add_train_arguments  # argparse only: no torch at parse time

    add_train_arguments(command("train", "train a UNet2DModel pipeline", command_train))

    from .serving.server import add_serve_arguments  # argparse only: no torch or FastAPI at parse time

    add_serve_arguments(command("serve", "serve models over HTTP: job queue, live progress, a web page",
                                command_serve))
    return parser


# -- running ---------------------------------------------------------------------------------------

def _silence_stdout() -> None:
    """After a broken pipe (``diffusekit info x.png | head -1``): no error at interpreter exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line on stderr (``--debug``: re-raised).

    A caller that already uses torch gets its thread count back afterwards."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return USAGE_STATUS
    except Exception as err:  # a bug: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"error: {type(err).__name__}: {err} (a bug? run again with --debug for the traceback)",
              file=sys.stderr)
        return BUG_STATUS
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
