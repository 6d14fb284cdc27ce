"""The diffusekit command: generate, info, schedulers."""

import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusekit.cli import main, read_png_parameters
from diffusekit.schedulers.names import SAMPLER_NAMES


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def test_generate_writes_pngs_with_parameters_and_never_overwrites(model_folder, tmp_path, capsys):
    args = ["generate", str(model_folder), "--steps", "2", "--seed", "5", "--batch", "2",
            "--scheduler", "euler_a", "--out", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 2 and all(p.endswith(".png") for p in first)
    params = read_png_parameters(first[0])
    assert params["seed"] == 5 and params["steps"] == 2 and params["scheduler"]["name"] == "euler_a"
    assert params["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
    assert [p.rsplit("/", 1)[-1] for p in first] == ["5-0.png", "5-1.png"]
    assert Image.open(first[0]).size == (8, 8)
    assert main(args) == 0
    second = capsys.readouterr().out.split()
    assert set(first).isdisjoint(second)
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_generate_rejects_options_the_pipeline_does_not_take(model_folder, tmp_path, capsys):
    assert main(["generate", str(model_folder), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: DDPMPipeline does not take prompt\n"


def test_info_prints_components_and_png_parameters(model_folder, tmp_path, capsys):
    assert main(["info", str(model_folder)]) == 0
    out = capsys.readouterr().out
    assert "DDPMPipeline" in out and "UNet2DModel" in out and "block_out_channels" in out
    main(["generate", str(model_folder), "--steps", "1", "--seed", "3", "--out", str(tmp_path)])
    png = capsys.readouterr().out.split()[0]
    assert main(["info", png]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_schedulers_lists_known_names(capsys):
    assert main(["schedulers"]) == 0
    out = capsys.readouterr().out
    for name in ("euler_a", "dpmpp_2m_karras", "unipc", "ddim"):
        assert name in out


def test_train_command_writes_a_loadable_pipeline_with_its_class_names(tmp_path, capsys):
    import json

    import numpy as np

    from diffusekit import DiffusionPipeline

    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((8, 8), 40 + 150 * (label == "dog") + i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "data"), "--resolution", "8", "--steps", "2", "--batch-size", "4",
            "--out", str(run), "--class-conditional", "--block-out-channels", "8,16",
            "--save-every", "2", "--sample-every", "0"]
    assert main(args) == 0
    assert "saved pipeline to" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(run)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 2 and images.shape[1:3] == (8, 8)
    assert json.loads((run / "class_labels.json").read_text()) == ["cat", "dog"]

    assert main(["generate", str(run), "--class-label", "dog", "--steps", "1", "--out", str(tmp_path / "g")]) == 0
    (png,) = capsys.readouterr().out.split()
    record = read_png_parameters(png)
    assert (record["class_label"], record["class_name"]) == (1, "dog")
    assert main(["generate", str(run), "--class-label", "bird", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err == "error: --class-label bird: not a class number or name; classes: cat, dog\n"

    # an existing run is not overwritten (nor its log appended to) without --overwrite
    log = (run / "train_log.jsonl").read_text()
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: --out {run}: the folder exists and is not empty; pass --overwrite "
                                       "to replace the run in it, or choose a new folder\n")
    (run / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert (run / "train_log.jsonl").read_text().count("\n") == log.count("\n") == 2
    assert (run / "notes.txt").read_text() == "mine"  # only what training writes is replaced

    # resuming in place continues the run; options that conflict with it are refused, naming both values
    resume = ["train", "--data", str(tmp_path / "data"), "--steps", "3", "--out", str(run), "--resume", str(run),
              "--sample-every", "0"]
    assert main([*resume, "--lr", "0.5", "--resolution", "16"]) == 2
    assert capsys.readouterr().err == (
        "error: --resume: options conflict with the run being resumed: --resolution 16 (the resumed run has 8); "
        "--lr 0.5 (the resumed run has 0.001). Leave them out to keep the run's values, or start a new run\n")
    assert main(resume) == 0  # unset options take the resumed run's values (resolution 8, 8,16 channels)
    capsys.readouterr()
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_help_shows_defaults_and_version_without_importing_torch(capsys):
    import subprocess
    import sys

    code = ("import sys; from diffusekit.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['train', '--help'], ['--version']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.rstrip().endswith(f"diffusekit {diffusekit.__version__}\nFalse")
    text = " ".join(result.stdout.split())
    assert "files are named SEED-INDEX.png (default: out)" in text
    assert "square image side (default: 16)" in text and "(default: cpu)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_threads_follow_physical_cores_and_load(tmp_path, monkeypatch):
    import diffusekit.cli_system as cli_system

    for cpu, core in enumerate([0, 0, 1, 1]):  # 4 logical CPUs on 2 cores
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "core_id").write_text(f"{core}\n")
        (tmp_path / f"cpu{cpu}" / "topology" / "physical_package_id").write_text("0\n")
    monkeypatch.setattr(cli_system, "_usable_cpus", lambda: [0, 1, 2, 3])
    assert cli_system.physical_cores(tmp_path) == 2
    assert cli_system.physical_cores(tmp_path / "missing") == 2  # half the logical CPUs
    monkeypatch.setattr(cli_system, "physical_cores", lambda: 12)
    monkeypatch.setattr(cli_system.os, "getloadavg", lambda: (1.7, 0.0, 0.0))
    assert cli_system.default_threads() == 7  # capped at 8, one core busy
    monkeypatch.setattr(cli_system.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert cli_system.default_threads() == 1
    try:
        assert cli_system.set_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match="--threads must be at least 1, got 0"):
        cli_system.set_threads(0)
    assert cli_system.progress_bar_options("sampling")["disable"]  # stderr is no terminal under pytest


def test_main_gives_the_caller_its_torch_threads_back(model_folder, tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(["generate", str(model_folder), "--steps", "1", "--threads", "2", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("name", sorted(SAMPLER_NAMES))
def test_every_scheduler_name_samples_the_embedded_model(name, tmp_path, capsys):
    assert main(["generate", "--scheduler", name, "--class-label", "3", "--steps", "5", "--seed", "1",
                 "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    (png,) = capsys.readouterr().out.split()
    record = read_png_parameters(png)
    assert record["scheduler"]["name"] == name and record["steps"] == 5
    assert Image.open(png).getextrema() != (0, 0)  # not a black image
