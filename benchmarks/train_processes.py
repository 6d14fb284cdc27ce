"""Training throughput: one process of N threads against N processes of one thread (``torchrun``).

    python benchmarks/train_processes.py [--task text-to-image|vae] [--processes 2] [--steps 80] [--batch 64]

Both runs train the same model on the same global batches (``--batch-size`` is per process); the
figure is seconds per optimizer step from ``train_log.jsonl``, over the steps after the first fifth
(warm-up: allocator, first passes). Runs in a temporary folder; a text-to-image run first trains a
10-step VAE for its latents (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = ("--data", "shapes", "--dataset-size", "2000", "--resolution", "64", "--sample-every", "0",
          "--save-every", "0", "--seed", "0")


def seconds_per_step(out: Path) -> float:
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    start = len(log) // 5
    return (log[-1]["seconds"] - log[start]["seconds"]) / (len(log) - 1 - start)


def train(arguments: list[str], processes: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "diffusekit"] if processes == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={processes}", "-m",
        "diffusekit"]
    subprocess.run([*launcher, "train", "--threads", str(threads), *arguments], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("text-to-image", "vae"), default="text-to-image")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    args = parser.parse_args()
    if args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} must be divisible by --processes {args.processes}")
    root = Path(tempfile.mkdtemp(prefix="train-processes-"))
    task = ["--task", args.task, "--steps", str(args.steps), *SHAPES]
    if args.task == "text-to-image":
        train(["--task", "vae", "--steps", "10", "--batch-size", "8", *SHAPES, "--out", str(root / "vae")],
              1, args.processes)
        task += ["--vae", str(root / "vae"), "--prediction-type", "v_prediction", "--beta-schedule", "linear"]
    results = {}
    for label, processes, threads in (("one process", 1, args.processes), ("processes", args.processes, 1)):
        out = root / label.replace(" ", "-")
        train([*task, "--batch-size", str(args.batch // processes), "--out", str(out)], processes, threads)
        results[label] = seconds_per_step(out)
    one, many = results["one process"], results["processes"]
    print(f"{args.task}, global batch {args.batch}, {args.steps} steps: one process of {args.processes} threads "
          f"{one:.3f} s/step; {args.processes} processes of 1 thread {many:.3f} s/step; speed-up {one / many:.2f}x")


if __name__ == "__main__":
    main()
