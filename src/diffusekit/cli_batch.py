"""``diffusekit generate MODEL --prompts FILE --out DIR``: one image per line of a prompts file.

Each line gets the seed ``--seed`` (default 0) + its line number, and the file ``LINE.png`` (line
numbers of the file, from 1), so the images do not depend on how the work is split. Run under
``accelerate launch --num_processes N -m diffusekit generate ...``, process r takes the lines
r, r + N, ... of the work (one device each); the files are the same as one process writes. Images
are written under a temporary name and renamed, so a file that exists is complete; a run that is
killed and started again skips every line whose image exists with the same parameters. When all
processes are done, the main one writes ``manifest.jsonl`` (line, seed, file, parameters), read
back from the images' own records.

Prompt files: ``.txt``, one prompt per line (for class-conditional models, a class number or
name), blank lines and ``#`` comments skipped; ``.jsonl``, one object per line with ``prompt`` and
optionally ``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``width``, ``height``,
``class_label``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli_metadata import CommandError, read_png_parameters, save_png

MANIFEST_NAME = "manifest.jsonl"
#: jsonl keys -> the ``generate`` option they set for their line.
LINE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
             "guidance": "guidance", "width": "width", "height": "height", "class_label": "class_label"}
_NUMBER_KEYS = {"seed": int, "steps": int, "width": int, "height": int, "guidance": float}


@dataclass(frozen=True)
class Job:
    """One line of the prompts file: its number (from 1) and the options it sets."""

    line: int
    options: dict[str, Any]

    @property
    def file_name(self) -> str:
        return f"{self.line:06d}.png"


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of a ``.txt`` or ``.jsonl`` prompts file; CommandError naming file and line for bad ones."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CommandError(f"--prompts {path}: cannot read it ({err})") from None
    jsonl = path.suffix == ".jsonl"
    jobs = []
    for number, text in enumerate(lines, start=1):
        if not text.strip() or (not jsonl and text.lstrip().startswith("#")):
            continue
        jobs.append(Job(number, _line_options(text, f"{path}:{number}") if jsonl else {"prompt": text.strip()}))
    if not jobs:
        raise CommandError(f"--prompts {path}: no prompts in it")
    return jobs


def _line_options(text: str, where: str) -> dict[str, Any]:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as err:
        raise CommandError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(entry, dict):
        raise CommandError(f"{where}: expected a JSON object, found {type(entry).__name__}")
    unknown = sorted(set(entry) - set(LINE_KEYS))
    if unknown:
        raise CommandError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(LINE_KEYS)})")
    for key, kind in _NUMBER_KEYS.items():
        if key in entry and (isinstance(entry[key], bool) or not isinstance(entry[key], (int, float))
                             or (kind is int and not float(entry[key]).is_integer())):
            raise CommandError(f"{where}: {key} must be a number{' (whole)' if kind is int else ''}, got {entry[key]!r}")
    return {LINE_KEYS[k]: (_NUMBER_KEYS[k](v) if k in _NUMBER_KEYS else v) for k, v in entry.items()}


def _process_split(cpu: bool):
    """(rank, world size, state or None): accelerate's split where a launcher started several processes
    (on CPU: gloo ranks, which accelerate only forms when told ``cpu=True``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, state


def job_args(args: argparse.Namespace, job: Job, is_class_conditional: bool) -> argparse.Namespace:
    """The ``generate`` options of one line: the command's, with the line's on top and its seed."""
    line_args = copy.copy(args)
    options = dict(job.options)
    if is_class_conditional and "class_label" not in options:
        options["class_label"] = options.pop("prompt", None)
    elif is_class_conditional:
        options.pop("prompt", None)
    for key, value in options.items():
        setattr(line_args, key, value)
    if "seed" not in job.options:
        line_args.seed = (args.seed or 0) + job.line
    line_args.batch = 1
    return line_args


def _done(path: Path, line: int, seed: int, prompt: Any) -> bool:
    """The image exists and was made for this line, seed and prompt."""
    if not path.is_file():
        return False
    try:
        record = read_png_parameters(path)
    except CommandError:
        return False
    return (record.get("line"), record.get("seed"), record.get("prompt")) == (line, seed, prompt)


def check_batch(args: argparse.Namespace) -> list[Job]:
    """The jobs of ``--prompts`` once the command's options are checked (nothing is loaded yet)."""
    from .cli_generate import check_options

    if args.from_image or args.prompt or args.image or args.mask or args.batch or args.grid or args.refiner:
        raise CommandError("--prompts takes no --from, --prompt, --image, --mask, --batch, --grid or --refiner "
                           "(give per-line parameters in a .jsonl file)")
    jobs = read_jobs(args.prompts)
    check_options(args)
    return jobs


class LineRunner:
    """The loaded pipeline of a batch run: makes one line's image into ``--out`` (a complete one is kept)."""

    def __init__(self, args: argparse.Namespace, device) -> None:
        from .cli_generate import load_pipeline

        self.args, self.device, self.out = args, device, Path(args.out)
        self.pipe, self.loaded = load_pipeline(args, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.conditional = "class_labels" in inspect.signature(self.pipe.__call__).parameters

    def run(self, job: Job) -> Path | None:
        """Write the line's image; its path, or None when a complete one was there already."""
        import torch

        from .cli_generate import _base_record, call_arguments, class_labels, resolved_values

        line_args, pipe = job_args(self.args, job, self.conditional), self.pipe
        path = self.out / job.file_name
        if _done(path, job.line, line_args.seed, line_args.prompt):
            return None
        try:
            labels = class_labels(pipe, line_args)
        except CommandError as err:
            raise CommandError(f"{self.args.prompts}:{job.line}: {err}") from None
        if labels is not None and len(labels) != 1:
            raise CommandError(f"{self.args.prompts}:{job.line}: give a class (number or name) for this model")
        kwargs = call_arguments(pipe, line_args, labels, torch.Generator("cpu").manual_seed(line_args.seed))
        resolved = resolved_values(pipe, line_args, kwargs)
        image = pipe(**kwargs).images[0]
        record = {**_base_record(pipe, line_args, self.loaded, line_args.seed, 1), **resolved, "line": job.line,
                  "device": str(torch.device(self.device).type), "width": image.width, "height": image.height,
                  "class_label": labels[0] if labels else None}
        save_png(image, path, record)
        return path


def command_batch(args: argparse.Namespace) -> int:
    """Run every line of ``--prompts`` (this process's share of them); print each file written."""
    from .cli_generate import make_out
    from .cli_system import check_device, progress_bar_options, set_threads

    jobs = check_batch(args)
    out = make_out(args.out)
    rank, world, state = _process_split(cpu=args.device == "cpu")
    set_threads(args.threads)
    device = check_device(args.device) if state is None or args.device == "cpu" else state.device
    from tqdm.auto import tqdm

    runner = LineRunner(args, device)
    mine = jobs[rank::world]
    bar_options = progress_bar_options("batch")
    bar = tqdm(total=len(mine), unit="image", **{**bar_options, "disable": bar_options["disable"] or rank != 0})
    for job in mine:
        path = runner.run(job)
        if path is not None:
            print(path)
        bar.update(1)
    bar.close()
    if state is not None:
        print(f"process {rank + 1} of {world}: {len(mine)} lines", file=sys.stderr)
        state.wait_for_everyone()
    if rank == 0:
        write_manifest(out, jobs)
    return 0


def write_manifest(out: Path, jobs: list[Job]) -> Path:
    """``manifest.jsonl`` in line order, from the records stored in the images."""
    from .configuration import atomic_write

    rows = []
    for job in jobs:
        record = read_png_parameters(out / job.file_name)
        rows.append({"line": job.line, "seed": record.get("seed"), "file": job.file_name, "parameters": record})
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
    return atomic_write(out / MANIFEST_NAME, lambda f: f.write(text))


def add_ray_arguments(gen: argparse.ArgumentParser) -> None:
    """``generate --prompts ... --ray`` options (argparse only: Ray is imported when ``--ray`` runs)."""
    gen.add_argument("--ray", action="store_true",
                     help="with --prompts: run the lines on Ray Data, one loaded pipeline per worker "
                          "(pip install 'diffusekit[ray]')")
    gen.add_argument("--ray-address", metavar="ADDR",
                     help="with --ray: a running cluster (e.g. auto, or HOST:6379) (default: start Ray on this machine)")
    gen.add_argument("--num-workers", type=int, metavar="N",
                     help="with --ray: workers, each holding the pipeline (default: the cluster's GPUs with "
                          "--device cuda, else 1)")
