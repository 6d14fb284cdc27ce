"""Tiny SDXL parts for the SDXL pipeline tests (the shapes of diffusers' own SDXL tests, smaller).

Two CLIP text encoders of width 32 (the second with a 32-wide projection): their hidden states
concatenate to the UNet's ``cross_attention_dim`` 64, and 6 time ids x 8 + 32 = 80 is the added
embedding's input. The refiner UNet takes the second encoder only (32) and 5 time ids (72).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_components import VAE_CONFIG, tiny_tokenizer

UNET_CONFIG = dict(
    block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=2,
)
REFINER_UNET_CONFIG = dict(UNET_CONFIG, cross_attention_dim=32, projection_class_embeddings_input_dim=72)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        timestep_spacing="leading", interpolation_type="linear")
__all__ = ["UNET_CONFIG", "REFINER_UNET_CONFIG", "SCHEDULER_CONFIG", "VAE_CONFIG", "text_encoders", "tiny_tokenizer"]


def _text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer),
        layer_norm_eps=1e-5, hidden_act="gelu", projection_dim=32,
    )


def text_encoders(tokenizer, seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """``(text_encoder, text_encoder_2)`` with seeded random weights."""
    torch.manual_seed(seed)
    first = CLIPTextModel(_text_config(tokenizer)).eval()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(_text_config(tokenizer)).eval()
    return first, second
