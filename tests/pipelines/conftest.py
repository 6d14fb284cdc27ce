"""Fixtures shared by the pipeline tests."""

import pytest
import torch

from diffusekit import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny Stable Diffusion components (diffusekit models, transformers CLIP), no safety checker."""
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    return dict(vae=AutoencoderKL(**VAE_CONFIG).eval(), text_encoder=tiny_text_encoder(tokenizer),
                tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET_CONFIG).eval(),
                scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None)
