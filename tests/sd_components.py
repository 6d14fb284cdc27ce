"""Tiny Stable Diffusion parts shared by the parity and the pipeline tests.

The UNet/VAE configs are plain dicts, usable with diffusekit's classes and the reference's alike;
the CLIP text encoder, tokenizer and image processor come from transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

UNET_CONFIG = dict(
    block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2,
)
VAE_CONFIG = dict(
    block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
#: A plain byte-level BPE vocabulary: every byte symbol (alone and word-final) plus a few merges.
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "a n", "an d</w>"]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_tokenizer(folder: Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of a tiny CLIP tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token="<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(model_max_length=77, **special)), encoding="utf-8")
    return folder


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(folder))


def tiny_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer),
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_feature_extractor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_safety_config() -> CLIPConfig:
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_tiny_sd_folder(folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """A tiny diffusekit StableDiffusionPipeline (DDIM, no safety checker) saved into ``folder``."""
    from diffusekit import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder
