"""The README's Python examples run as written (Hub ids swapped for tiny local folders)."""

import re
from pathlib import Path

import pytest
import torch

from diffusekit import (AutoencoderKL, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel,
                        UNet2DModel, UniPCMultistepScheduler)
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def block_with(text: str) -> str:
    (found,) = [b for b in BLOCKS if text in b]
    return found


def test_embedded_model_example():
    scope: dict = {}
    exec(block_with("load_embedded_pipeline()"), scope)
    assert len(scope["images"]) == 2


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=100)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    unet.save_pretrained(folder)  # like google/ddpm-cat-256: components in subfolders and at the root
    scheduler.save_pretrained(folder)
    return folder


def test_ddpm_quick_start_and_manual_loop(ddpm_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for marker in ("image.save(\"cat.png\")", "scheduler.step(residual, t, sample)"):
        code = block_with(marker).replace('"google/ddpm-cat-256"', repr(str(ddpm_folder)))
        scope: dict = {}
        exec(code, scope)
    assert (tmp_path / "cat.png").is_file()
    assert scope["sample"].shape == (1, 3, 8, 8) and torch.isfinite(scope["sample"]).all()


def test_stable_diffusion_manual_loop(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=UniPCMultistepScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path / "sd")
    code = block_with("text_encoder(ids)[0]").replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"',
                                                    repr(str(tmp_path / "sd")))
    code = code.replace("(1, unet.config.in_channels, 64, 64)", "(1, unet.config.in_channels, 8, 8)")
    scope: dict = {}
    exec(code, scope)
    assert scope["image"].shape == (1, 3, 16, 16) and torch.isfinite(scope["image"]).all()
