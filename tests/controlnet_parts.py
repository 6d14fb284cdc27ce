"""Tiny ControlNets that change the image: an SDXL one for the tiny SDXL UNet of
``sdxl_pipeline_parts`` (32-pixel control images, 16-pixel latents: one stride-2 step in the
conditioning embedding), and random weights for any net (such as ``ControlNetModel.from_unet``'s)."""

from __future__ import annotations

import torch

from sdxl_pipeline_parts import UNET_CONFIG

#: The UNet's down path and added conditioning ("text_time"), a two-step conditioning embedding.
CONTROLNET_CONFIG = {**{k: v for k, v in UNET_CONFIG.items() if k not in ("up_block_types", "out_channels",
                                                                          "sample_size")},
                     "conditioning_embedding_out_channels": (4, 8)}


def random_controlnet(cls, seed: int, **changes):
    """``cls(**CONTROLNET_CONFIG, **changes)`` (diffusekit's or the reference's ControlNetModel) with
    seeded weights, its zero-initialised convolutions random too (else the net adds nothing)."""
    torch.manual_seed(seed)
    return randomized(cls(**{**CONTROLNET_CONFIG, **changes}))


def randomized(net):
    """``net`` with its all-zero parameters (the zero convolutions) drawn from N(0, 0.3^2), in eval mode."""
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.3)
    return net.eval()
