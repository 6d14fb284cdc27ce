"""The command line on a tiny Stable Diffusion folder: task from inputs, PNG parameters, convert."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusekit import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusekit.cli import main, read_png_parameters
from lora_files import lora_tensors, peft_layout
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


def _generate_paths(capsys, *args) -> list[Path]:
    return [Path(p) for p in _generate(capsys, *args)]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


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


def test_img2img_with_a_lora_and_scheduler_is_redone_exactly(sd_folder, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    save_file(peft_layout(lora_tensors(StableDiffusionPipeline.from_pretrained(sd_folder), seed=1)), str(lora))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    (made,) = _generate_paths(capsys, sd_folder, "--prompt", "a cat", "--negative-prompt", "dog", "--image",
                              tmp_path / "in.png", "--lora", f"{lora}:0.6", "--scheduler", "euler_a", "--steps", "3",
                              "--seed", "5", "--out", tmp_path)
    record = read_png_parameters(made)
    assert record["pipeline"] == "StableDiffusionImg2ImgPipeline" and record["strength"] == 0.8  # the default
    assert record["guidance"] == 7.5 and record["steps"] == 3
    assert record["loras"] == [{"path": str(lora.resolve()), "scale": 0.6, "sha256": record["loras"][0]["sha256"]}]
    assert len(record["loras"][0]["sha256"]) == 64
    assert record["image"]["path"] == str((tmp_path / "in.png").resolve()) and record["mask"] is None
    assert record["scheduler"]["name"] == "euler_a"
    summary = Image.open(made).text["parameters"]
    assert summary.startswith("a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 5, "
                              "Size: 32x32")
    assert "Denoising strength: 0.8" in summary

    (again,) = _generate_paths(capsys, "--from", made, "--out", tmp_path / "again")
    assert np.array_equal(_pixels(again), _pixels(made))
    assert read_png_parameters(again) == record
    (no_lora,) = _generate_paths(capsys, "--from", made, "--lora", f"{lora}:0", "--out", tmp_path / "no-lora")
    assert read_png_parameters(no_lora)["loras"][0]["scale"] == 0.0
    assert not np.array_equal(_pixels(no_lora), _pixels(made))


def test_changed_inputs_are_warned_about_and_zero_steps_refused(sd_folder, tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    (made,) = _generate_paths(capsys, sd_folder, "--prompt", "a cat", "--image", tmp_path / "in.png",
                              "--steps", "2", "--seed", "1", "--out", tmp_path)
    Image.new("RGB", (32, 32), (30, 200, 30)).save(tmp_path / "in.png")
    assert main(["generate", "--from", str(made), "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().err == (f"warning: --image {(tmp_path / 'in.png').resolve()} changed since the image "
                                       "was made (sha256 differs)\n")
    assert main(["generate", str(sd_folder), "--prompt", "a cat", "--image", str(tmp_path / "in.png"), "--steps", "1",
                 "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == ("error: --steps 1 with --strength 0.8 leaves no denoising step "
                                       "(steps x strength must be at least 1)\n")
    assert not (tmp_path / "none").exists()
