"""Tiny SDXL base and refiner folders saved by the reference (in float32, fixed seeds)."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_components import VAE_CONFIG, tiny_tokenizer

#: The reference's tiny SDXL UNet (tests/pipelines/stable_diffusion_xl), narrower: 6 * 8 + 32 = 80 added inputs
BASE_UNET = dict(block_out_channels=(8, 16), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                 cross_attention_dim=64, norm_num_groups=1)
#: The refiner: only the OpenCLIP encoder (40 wide), aesthetic score in the added inputs: 5 * 8 + 32 = 72
REFINER_UNET = dict(BASE_UNET, projection_class_embeddings_input_dim=72, cross_attention_dim=40)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading")


def _text_config(tokenizer, hidden_size: int, **extra) -> CLIPTextConfig:
    """CLIP-L stand-in 24 wide, OpenCLIP-bigG stand-in 40 wide (24 + 40 = the UNet's 64): the widths
    must differ, as in the real models, for the reference to tell the two encoders of a file apart."""
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, hidden_size=hidden_size, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer),
                          layer_norm_eps=1e-5, projection_dim=32, **extra)


def save_reference_sdxl(folder: Path, refiner: bool = False, seed: int = 0) -> Path:
    """A tiny SDXL base (or refiner) pipeline folder written by the reference."""
    tokenizer = tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    torch.manual_seed(seed)
    parts = dict(unet=diffusers.UNet2DConditionModel(**(REFINER_UNET if refiner else BASE_UNET)),
                 vae=diffusers.AutoencoderKL(**VAE_CONFIG, force_upcast=True),
                 scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER),
                 text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, 40, hidden_act="gelu")).eval(),
                 tokenizer_2=tokenizer)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                          requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False)
    else:
        parts.update(text_encoder=CLIPTextModel(_text_config(tokenizer, 24)).eval(), tokenizer=tokenizer)
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    pipe.save_pretrained(folder)
    return folder

