"""The command line on a tiny Stable Diffusion folder: task from inputs, PNG parameters, convert."""

import pytest
import torch
from PIL import Image

from diffusekit import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusekit.cli import main, read_png_parameters
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def _generate(capsys, *args):
    assert main(["generate", *map(str, args)]) == 0
    return capsys.readouterr().out.split()


def test_text_image_and_inpaint_tasks_follow_the_inputs(sd_folder, tmp_path, capsys):
    common = ["--steps", "2", "--height", "32", "--width", "32", "--guidance", "3", "--out", tmp_path]
    (text_png,) = _generate(capsys, sd_folder, "--prompt", "a cat", "--negative-prompt", "dog", *common)
    params = read_png_parameters(text_png)
    assert params["prompt"] == "a cat" and params["negative_prompt"] == "dog" and params["guidance"] == 3.0
    assert params["pipeline"] == "StableDiffusionPipeline" and (params["width"], params["height"]) == (32, 32)
    assert params["steps"] == 2 and params["model"] == str(sd_folder.resolve())

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    (img_png,) = _generate(capsys, sd_folder, "--prompt", "a cat", "--image", tmp_path / "in.png",
                           "--strength", "0.5", *common)
    assert read_png_parameters(img_png)["pipeline"] == "StableDiffusionImg2ImgPipeline"

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    (inpaint_png,) = _generate(capsys, sd_folder, "--prompt", "a cat", "--image", tmp_path / "in.png",
                               "--mask", tmp_path / "mask.png", *common)
    assert read_png_parameters(inpaint_png)["pipeline"] == "StableDiffusionInpaintPipeline"

    assert main(["info", inpaint_png]) == 0
    assert "prompt: a cat" in capsys.readouterr().out


def test_convert_folder_to_file_and_back(sd_folder, tmp_path, capsys):
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(sd_folder), str(single)]) == 0
    assert capsys.readouterr().out.strip() == str(single)
    assert single.stat().st_size > 0
    assert main(["convert", str(sd_folder), str(single)]) == 2
    assert "exists" in capsys.readouterr().err
    folder = tmp_path / "folder"
    assert main(["convert", str(single), str(folder), "--config", str(sd_folder)]) == 0
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
