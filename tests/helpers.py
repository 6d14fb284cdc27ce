"""Tiny components shared by the non-parity tests."""

from __future__ import annotations

import torch
from torch import nn

from diffusekit.configuration import register_to_config
from diffusekit.models.modeling import ModelMixin


class TinyModel(ModelMixin):
    """A two-layer model with a config, enough to exercise saving and loading."""

    @register_to_config
    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.relu(self.conv_in(x)))


def tiny_model(seed: int = 0, **config) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**config)
