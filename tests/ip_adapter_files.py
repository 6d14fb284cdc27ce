"""Tiny random IP-Adapter files in the reference's layout (``image_proj.*``, ``ip_adapter.{2k+1}.to_*_ip.weight``)
and a tiny CLIP vision image encoder saved beside them (``image_encoder/``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8, projection_dim=16)
RESAMPLER_WIDTH, RESAMPLER_QUERIES, RESAMPLER_DEPTH = 64, 3, 4  # 64: one head of the reference's fixed 64


def tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()


def _cross_attention_shapes(unet) -> list[tuple[int, int]]:
    """(inner dim, cross dim) of each cross-attention layer, in ``attn_processors`` order (either library)."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    layers = [unet.get_submodule(n.removesuffix(".processor")) for n in names]
    return [(layer.to_k.out_features, layer.to_k.in_features) for layer in layers]


def _plain_proj(gen: torch.Generator, cross: int) -> dict[str, torch.Tensor]:
    embed = VISION["projection_dim"]
    return {"proj.weight": torch.randn(4 * cross, embed, generator=gen) * 0.3,
            "proj.bias": torch.randn(4 * cross, generator=gen) * 0.1,
            "norm.weight": 1 + torch.randn(cross, generator=gen) * 0.1, "norm.bias": torch.randn(cross, generator=gen)}


def _plus_proj(gen: torch.Generator, cross: int) -> dict[str, torch.Tensor]:
    width, embed = RESAMPLER_WIDTH, VISION["hidden_size"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    state = {"latents": rand(1, RESAMPLER_QUERIES, width, scale=1.0), "proj_in.weight": rand(width, embed),
             "proj_in.bias": rand(width), "proj_out.weight": rand(cross, width), "proj_out.bias": rand(cross),
             "norm_out.weight": 1 + rand(cross), "norm_out.bias": rand(cross)}
    for i in range(RESAMPLER_DEPTH):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"layers.{i}.{norm}.weight"] = 1 + rand(width)
            state[f"layers.{i}.{norm}.bias"] = rand(width)
        state[f"layers.{i}.0.to_q.weight"] = rand(width, width)
        state[f"layers.{i}.0.to_kv.weight"] = rand(2 * width, width)
        state[f"layers.{i}.0.to_out.weight"] = rand(width, width)
        state[f"layers.{i}.1.1.weight"] = rand(4 * width, width)
        state[f"layers.{i}.1.3.weight"] = rand(width, 4 * width)
    return state


def ip_adapter_state(unet, kind: str = "plain", seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat safetensors keys for ``unet`` (any library): ``kind`` "plain" or "plus"."""
    gen = torch.Generator().manual_seed(seed)
    shapes = _cross_attention_shapes(unet)
    cross = shapes[0][1]
    proj = _plain_proj(gen, cross) if kind == "plain" else _plus_proj(gen, cross)
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, (inner, width) in enumerate(shapes):
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch.randn(inner, width, generator=gen) * 0.5
    return state


def save_ip_adapter(folder: Path, unet, kind: str = "plain", seed: int = 0, encoder: bool = True,
                    name: str = "ip-adapter.safetensors") -> Path:
    """``folder/name`` (+ ``folder/image_encoder`` when ``encoder``); returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    save_file(ip_adapter_state(unet, kind, seed), str(path))
    if encoder:
        tiny_image_encoder().save_pretrained(folder / "image_encoder")
    return path
