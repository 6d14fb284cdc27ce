"""Training across processes: two accelerate ranks (gloo, CPU) with half the batch each train the same
model as one process with the whole batch (a UNet2DModel, a VAE, a text-to-image model), and a resumed
two-process run equals an uninterrupted one."""

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


def _launch_two_processes(*train_arguments: str) -> subprocess.CompletedProcess:
    """``diffusekit train`` under ``accelerate launch``: two CPU processes (gloo)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "diffusekit", "train", *train_arguments]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train_two_processes(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _launch_two_processes("--data", str(data), "--out", str(out), "--batch-size", "4", *TRAIN, *extra)


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


#: The shapes tasks, tiny: 16 images at 32x32, three steps.
SHAPES = ("--data", "shapes", "--dataset-size", "16", "--resolution", "32", "--steps", "3", "--sample-every", "0",
          "--block-out-channels", "16,32", "--threads", "1")


def test_two_ranks_train_the_vae_and_text_to_image_model_of_one_process(tmp_path):
    """Same losses at every step; the VAEs reconstruct and the pipelines draw (same seed) alike."""
    from diffusekit import AutoencoderKL, StableDiffusionPipeline

    runs = {}
    for processes, batch in ((1, "4"), (2, "2")):
        vae, model = tmp_path / f"vae{processes}", tmp_path / f"model{processes}"
        tasks = (("--task", "vae", "--out", str(vae)),
                 ("--task", "text-to-image", "--vae", str(tmp_path / "vae1"), "--out", str(model)))
        for task in tasks:
            arguments = (*SHAPES, "--batch-size", batch, *task)
            if processes == 1:
                assert run(build_parser().parse_args(["train", *arguments])) == 0
            else:
                _launch_two_processes(*arguments)
        runs[processes] = vae, model
    for index in (0, 1):
        one, two = _log(runs[1][index]), _log(runs[2][index])
        assert [e["processes"] for e in two] == [2] * 3 and [e["step"] for e in two] == [1, 2, 3]
        assert [e["loss"] for e in two] == pytest.approx([e["loss"] for e in one], abs=TOLERANCE)
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    decoded = [AutoencoderKL.from_pretrained(runs[p][0])(images).sample for p in (1, 2)]
    assert (decoded[0] - decoded[1]).abs().max().item() < TOLERANCE
    drawn = []
    for processes in (1, 2):
        pipe = StableDiffusionPipeline.from_pretrained(runs[processes][1])
        pipe.set_progress_bar_config(disable=True)
        drawn.append(pipe("a red circle at the top on a white background", num_inference_steps=2, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images)
    assert abs(drawn[0] - drawn[1]).max() < TOLERANCE
