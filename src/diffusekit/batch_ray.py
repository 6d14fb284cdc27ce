"""``diffusekit generate MODEL --prompts FILE --out DIR --ray``: the lines of a prompts file on Ray Data.

The driver reads and checks the file, then runs its lines through ``map_batches`` with a stateful
worker class: Ray starts ``--num-workers`` actors (one GPU each with ``--device cuda``, half a
logical CPU each on CPU), each loads the pipeline once and makes one line at a time with the same
code as the local run (:class:`~diffusekit.cli_batch.LineRunner`: the line's seed, its file name,
atomic PNGs, complete images skipped). So the files do not depend on how Ray spreads the lines, and
the driver writes ``manifest.jsonl`` at the end as the local run does. Workers write into ``--out``
themselves: on a cluster of several machines it must be a folder every node sees at the same path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .cli_batch import Job, LineRunner, check_batch, write_manifest
from .cli_metadata import CommandError

#: Logical CPUs a CPU worker asks Ray for (fractional, so that several fit on a small machine;
#: torch's threads are set by ``--threads``, not by this).
CPU_WORKER_CPUS = 0.5


def import_ray(part: str = "data"):
    """The ``ray`` module with ``ray.PART`` (data, serve) imported; ImportError naming the extra when
    it is not installed."""
    import importlib

    try:
        importlib.import_module(f"ray.{part}")
    except ImportError as err:
        raise ImportError(f"--ray needs Ray {part.title()}: pip install 'diffusekit[ray]' ({err})") from None
    return sys.modules["ray"]


def init_ray(address: str | None, *, local_cpus: int | None = None) -> bool:
    """Connect to the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://...``), or start Ray
    here (no dashboard) when there is none; False when this process was connected already."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                               "configure_logging": True}
    if address:
        ray.init(address=address, **options)
    else:
        import os

        ray.init(num_cpus=local_cpus or os.cpu_count(), **options)
    return True


class LineWorker:
    """One Ray Data worker: the pipeline loaded once, then one line per call."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .cli_system import check_device, set_threads

        set_threads(args.threads)
        # Ray shows each GPU actor its own GPU only, as cuda:0.
        self.runner = LineRunner(args, check_device("cuda" if args.device.startswith("cuda") else args.device))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Each line's ``written`` (False: it was complete) and ``error``: the message of a user error
        (a bad line), which Ray would pass back as text inside its own wrapper otherwise."""
        written, errors = [], []
        for line, options in zip(batch["line"], batch["options"]):
            try:
                written.append(self.runner.run(Job(int(line), json.loads(options))) is not None)
                errors.append("")
            except (ValueError, OSError) as err:
                written.append(False)
                errors.append(str(err))
        return {"line": [int(line) for line in batch["line"]], "written": written, "error": errors}


def worker_count(args: argparse.Namespace) -> int:
    """``--num-workers``, else the cluster's GPUs (``--device cuda``) or 1."""
    if args.num_workers is not None:
        return args.num_workers
    if not args.device.startswith("cuda"):
        return 1
    gpus = int(import_ray().cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise CommandError("--device cuda --ray: the Ray cluster has no GPUs")
    return gpus


def worker_resources(device: str) -> dict[str, float]:
    """What each worker asks Ray for: one GPU, or a fraction of a CPU."""
    return {"num_gpus": 1} if device.startswith("cuda") else {"num_cpus": CPU_WORKER_CPUS}


def command_batch_ray(args: argparse.Namespace) -> int:
    """Make every line's image on Ray (``--ray-address``, ``--num-workers``); print each file written,
    then write the manifest."""
    from .cli_generate import make_out

    jobs = check_batch(args)
    out = make_out(args.out)
    if args.num_workers is not None and args.num_workers < 1:
        raise CommandError(f"--num-workers must be at least 1, got {args.num_workers}")
    ray = import_ray()
    started = init_ray(args.ray_address)
    try:
        workers = min(worker_count(args), len(jobs))
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        rows = ray.data.from_items([{"line": job.line, "options": json.dumps(job.options)} for job in jobs],
                                   override_num_blocks=len(jobs))
        results = rows.map_batches(LineWorker, fn_constructor_args=(args,), batch_size=1,
                                   compute=ray.data.ActorPoolStrategy(size=workers), **worker_resources(args.device))
        from tqdm.auto import tqdm

        from .cli_system import progress_bar_options

        with tqdm(total=len(jobs), unit="image", **progress_bar_options("batch")) as bar:
            for row in results.iter_rows():
                if row["error"]:
                    raise CommandError(row["error"])
                if row["written"]:
                    print(out / f"{int(row['line']):06d}.png", flush=True)
                bar.update(1)
    finally:
        if started:
            ray.shutdown()
    write_manifest(out, jobs)
    return 0
