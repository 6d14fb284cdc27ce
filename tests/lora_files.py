"""Random LoRA weights for the tiny SD pipeline of ``sd_components``, in the peft and kohya layouts."""

from __future__ import annotations

import torch
from torch import nn

from diffusekit.configuration import register_to_config
from diffusekit.models.modeling import ModelMixin

#: Linear layers of attention and MLP, a 1x1 conv (proj_in), a 3x3 conv (resnet), the time embedding
UNET_TARGETS = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.1.attentions.0.proj_in",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "up_blocks.1.resnets.0.conv1",
    "mid_block.resnets.0.time_emb_proj",
]
TE_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]


def lora_tensors(pipe, seed: int, rank: int = 2) -> dict:
    """{(component, path): (down, up)} for random rank-``rank`` adapters on the targets above."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component, paths in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        model = getattr(pipe, component)
        for path in paths:
            weight = model.get_submodule(path.removeprefix("text_model.")).weight
            down_shape = (rank, *weight.shape[1:])
            up_shape = (weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []))
            out[component, path] = (torch.randn(down_shape, generator=gen) * 0.3,
                                    torch.randn(up_shape, generator=gen) * 0.3)
    return out


def peft_layout(tensors: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for (component, path), (down, up) in tensors.items():
        sd[f"{component}.{path}.lora_A.weight"] = down
        sd[f"{component}.{path}.lora_B.weight"] = up
    return sd


def kohya_layout(tensors: dict, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    sd = {}
    for (component, path), (down, up) in tensors.items():
        name = ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


class Tiny(ModelMixin):
    """A two-Linear model (``to_q``, ``to_k``) for the model-level adapter tests."""

    @register_to_config
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)

    def forward(self, x, cross_attention_kwargs=None):
        return self.to_k(self.to_q(x))
