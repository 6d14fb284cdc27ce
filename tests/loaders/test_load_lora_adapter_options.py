"""``model.load_lora_adapter(..., use_safetensors=...)`` reads only that format's file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusekit.configuration import register_to_config
from diffusekit.loaders.lora import LoraLoaderMixin
from diffusekit.models.modeling import ModelMixin


class Tiny(ModelMixin):
    @register_to_config
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.to_q = nn.Linear(width, width)

    def forward(self, x):
        return self.to_q(x)


def test_use_safetensors_picks_the_file_format(tmp_path):
    g = torch.Generator().manual_seed(0)
    lora = {"to_q.lora_A.weight": torch.randn(2, 4, generator=g), "to_q.lora_B.weight": torch.randn(4, 2, generator=g)}
    LoraLoaderMixin.save_lora_weights(tmp_path / "bin", unet_lora_layers=lora, safe_serialization=False)
    x = torch.randn(3, 4, generator=g)
    torch.manual_seed(0)
    model = Tiny()
    plain = model(x)
    model.load_lora_adapter(tmp_path / "bin", prefix="unet", use_safetensors=False)
    assert not torch.allclose(model(x), plain)
    with pytest.raises(OSError, match="pytorch_lora_weights.safetensors"):
        Tiny().load_lora_adapter(tmp_path / "bin", prefix="unet", use_safetensors=True)
