"""Writes a ControlNet state dict (diffusers names) in the original single-file layout
(lllyasviel's ControlNet: ``input_blocks``, ``input_hint_block``, ``zero_convs``...), written
independently of diffusekit's loader so the two check each other."""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _original_name(key: str, layers: int, hint_convs: int) -> str:
    fixed = [(r"conv_in\.", "input_blocks.0.0."), (r"time_embedding\.linear_1\.", "time_embed.0."),
             (r"time_embedding\.linear_2\.", "time_embed.2."), (r"add_embedding\.linear_1\.", "label_emb.0.0."),
             (r"add_embedding\.linear_2\.", "label_emb.0.2."),
             (r"controlnet_cond_embedding\.conv_in\.", "input_hint_block.0."),
             (r"controlnet_cond_embedding\.conv_out\.", f"input_hint_block.{2 * hint_convs + 2}."),
             (r"controlnet_mid_block\.", "middle_block_out.0."), (r"mid_block\.attentions\.0\.", "middle_block.1.")]
    for pattern, original in fixed:
        if re.match(pattern, key):
            return original + key[re.match(pattern, key).end():]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.0.{_RESNET[m[3]]}.{m[4]}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    raise KeyError(f"no original name for {key}")


def original_controlnet_state(state: dict[str, torch.Tensor], config: dict, prefix: str = "") -> dict:
    """``state`` (a ControlNetModel's) under the original names, each key prefixed by ``prefix``."""
    hint_convs = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    return {prefix + _original_name(k, config["layers_per_block"], hint_convs): v.contiguous()
            for k, v in state.items()}
