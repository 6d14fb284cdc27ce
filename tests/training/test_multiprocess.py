"""Training across processes: two accelerate ranks (gloo, CPU) with half the batch each train the same
model as one process with the whole batch, and a resumed two-process run equals an uninterrupted one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusekit.cli import build_parser, run

pytest.importorskip("accelerate")

#: Two classes of 8x8 images, grad accumulation on: 4 steps, a checkpoint every 2. Two channels per norm group
#: (16 channels, 8 groups): with one, biases before a GroupNorm get zero gradients, whose rounding noise
#: AdamW scales up to full-size steps.
TRAIN = ("--resolution", "8", "--block-out-channels", "16,16", "--steps", "4", "--save-every", "2",
         "--sample-every", "0", "--lr", "2e-3", "--class-conditional", "--grad-accum", "2", "--threads", "1")
#: Float32 sums over a batch split in two, and gloo's all-reduce, round differently from one process.
TOLERANCE = 1e-4
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "ema.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for label, name in enumerate(("bars", "squares")):
        (folder / name).mkdir()
        for i in range(8):
            image = Image.new("RGB", (8, 8), (0, 0, 0))
            for y in range(8):
                for x in range(8):
                    lit = 2 <= x < 6 and 2 <= y < 6 if label else x == 2 + i % 4
                    image.putpixel((x, y), (255, 32 * i, 255 - 32 * i) if lit else (0, 0, 0))
            image.save(folder / name / f"{i}.png")
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_two_processes(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "diffusekit", "train", "--data", str(data), "--out", str(out), "--batch-size", "4", *TRAIN, *extra]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def _largest_difference(a: Path, b: Path) -> float:
    tensors_a, tensors_b = load_file(a), load_file(b)
    assert tensors_a.keys() == tensors_b.keys()
    return max((tensors_a[k] - tensors_b[k]).abs().max().item() for k in tensors_a)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert run(build_parser().parse_args(["train", "--data", str(data), "--out", str(out), "--batch-size", "8",
                                          *TRAIN])) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    _train_two_processes(data, out)
    return out


def test_two_ranks_with_half_batches_match_one_process(one_process, two_processes):
    one, two = _log(one_process), _log(two_processes)
    assert [e["processes"] for e in one] == [1] * 4 and [e["processes"] for e in two] == [2] * 4
    assert [e["step"] for e in two] == [1, 2, 3, 4]  # one log, written by the main process only
    assert [e["lr"] for e in two] == [e["lr"] for e in one]
    assert [e["loss"] for e in two] == pytest.approx([e["loss"] for e in one], abs=TOLERANCE)
    end_one, end_two = _checkpoint(one_process, 4), _checkpoint(two_processes, 4)
    for name in WEIGHTS:
        assert _largest_difference(end_one / name, end_two / name) < TOLERANCE, name
    # each rank saved its own random states; the shared part once
    assert sorted(p.name for p in end_two.glob("rng-*")) == ["rng-0.json", "rng-0.safetensors", "rng-1.json",
                                                              "rng-1.safetensors"]
    state_one, state_two = (json.loads((d / "trainer_state.json").read_text()) for d in (end_one, end_two))
    assert state_two["data_order"] == state_one["data_order"]  # the same global batches were taken
    assert (two_processes / "model_index.json").is_file()


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(data, two_processes, tmp_path):
    resumed = tmp_path / "resumed"
    _train_two_processes(data, resumed, "--resume", str(_checkpoint(two_processes, 2)))
    straight = {e["step"]: e["loss"] for e in _log(two_processes)}
    assert {e["step"]: e["loss"] for e in _log(resumed)} == {3: straight[3], 4: straight[4]}
    for name in (*WEIGHTS, "optimizer.safetensors"):
        a, b = load_file(_checkpoint(two_processes, 4) / name), load_file(_checkpoint(resumed, 4) / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
