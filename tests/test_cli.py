"""The diffusekit command: generate, info, schedulers."""

import pytest
import torch
from PIL import Image

from diffusekit import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusekit.cli import main, read_png_parameters


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


def test_train_command_writes_a_loadable_pipeline(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from diffusekit import DiffusionPipeline

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((8, 8), 40 + 150 * (label == "b") + i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    args = ["train", "--data", str(tmp_path / "data"), "--resolution", "8", "--steps", "2", "--batch-size", "4",
            "--out", str(tmp_path / "run"), "--class-conditional", "--block-out-channels", "8,16",
            "--save-every", "2", "--sample-every", "0"]
    assert main(args) == 0
    assert "saved pipeline to" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 2 and images.shape[1:3] == (8, 8)
