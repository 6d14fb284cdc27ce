"""The command line on tiny SDXL folders: the SDXL tasks from the inputs, the base-to-refiner hand-off."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import (
    AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusekit.cli import main, read_png_parameters
from sdxl_pipeline_parts import (
    REFINER_UNET_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoders, tiny_tokenizer,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base folder, refiner folder, the base pipeline, the refiner pipeline)."""
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=UNet2DConditionModel(**UNET_CONFIG).eval(), scheduler=scheduler)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2,
                                               tokenizer=None, tokenizer_2=tokenizer,
                                               unet=UNet2DConditionModel(**REFINER_UNET_CONFIG).eval(),
                                               scheduler=scheduler, requires_aesthetics_score=True)
    paths = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("refiner")
    for pipe, folder in zip((base, refiner), paths):
        pipe.save_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
    return (*paths, base, refiner)


def _generate(capsys, *args):
    assert main(["generate", *map(str, args)]) == 0
    return capsys.readouterr().out.split()


def test_sdxl_tasks_follow_the_inputs(folders, tmp_path, capsys):
    base_folder = folders[0]
    common = ["--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "--out", tmp_path]
    (text_png,) = _generate(capsys, base_folder, *common)
    assert read_png_parameters(text_png)["pipeline"] == "StableDiffusionXLPipeline"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    (img_png,) = _generate(capsys, base_folder, "--image", tmp_path / "in.png", "--strength", "0.5", *common)
    assert read_png_parameters(img_png)["pipeline"] == "StableDiffusionXLImg2ImgPipeline"
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    (inpaint_png,) = _generate(capsys, base_folder, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                               *common)
    params = read_png_parameters(inpaint_png)
    assert params["pipeline"] == "StableDiffusionXLInpaintPipeline" and params["refiner"] is None


def test_refiner_hand_off_matches_the_api_and_replays(folders, tmp_path, capsys):
    base_folder, refiner_folder, base, refiner = folders
    (png,) = _generate(capsys, base_folder, "--prompt", "a cat", "--steps", "4", "--height", "32", "--width", "32",
                       "--seed", "7", "--refiner", refiner_folder, "--refiner-start", "0.5", "--out", tmp_path)
    params = read_png_parameters(png)
    assert params["refiner"] == str(refiner_folder.resolve()) and params["refiner_start"] == 0.5

    latents = base("a cat", num_inference_steps=4, height=32, width=32, denoising_end=0.5, output_type="latent",
                   generator=torch.Generator().manual_seed(7)).images
    expected = refiner("a cat", image=latents, num_inference_steps=4, denoising_start=0.5,
                       generator=torch.Generator().manual_seed(7)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(expected))

    (again,) = _generate(capsys, "--from", png, "--out", tmp_path / "again")
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))


@pytest.mark.parametrize("extra, message", [
    (["--refiner-start", "0.5"], "--refiner-start needs --refiner"),
    (["--refiner", "{refiner}", "--refiner-start", "1.5"], "strictly between 0 and 1"),
    (["--refiner", "{base}/missing"], "--refiner"),
])
def test_refiner_option_errors(folders, tmp_path, capsys, extra, message):
    extra = [e.format(base=folders[0], refiner=folders[1]) for e in extra]
    assert main(["generate", str(folders[0]), "--prompt", "a", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_single_files_are_picked_by_family(folders, tmp_path, capsys):
    """An SDXL base and refiner as original-layout files: generate reads the family from the keys and
    makes the images their folders make."""
    from safetensors.torch import save_file

    from diffusekit.loaders.single_file import pipeline_to_original

    base_folder, refiner_folder, base, refiner = folders
    files = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    for pipe, path in zip((base, refiner), files):
        save_file({k: v.contiguous() for k, v in pipeline_to_original(pipe).items()}, str(path))
    common = ["--prompt", "a cat", "--steps", "4", "--height", "32", "--width", "32", "--seed", "3"]
    (from_folder,) = _generate(capsys, base_folder, *common, "--refiner", refiner_folder, "--out", tmp_path / "a")
    (from_file,) = _generate(capsys, files[0], "--config", base_folder, *common, "--refiner", refiner_folder,
                             "--out", tmp_path / "b")
    assert read_png_parameters(from_file)["pipeline"] == "StableDiffusionXLPipeline"
    np.testing.assert_array_equal(np.asarray(Image.open(from_file)), np.asarray(Image.open(from_folder)))
    assert main(["generate", str(base_folder), "--config", str(base_folder), *common, "--out", str(tmp_path)]) == 2
    assert "--config is for single-file models" in capsys.readouterr().err
