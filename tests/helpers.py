"""Tiny components shared by the non-parity tests."""

from __future__ import annotations

import torch

from diffusekit.configuration import register_to_config
from diffusekit.models import layers
from diffusekit.models.modeling import ModelMixin


class TinyModel(ModelMixin):
    """A two-layer model with a config, enough to exercise saving and loading."""

    @register_to_config
    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.conv_in = layers.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = layers.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.relu(self.conv_in(x)))


def tiny_model(seed: int = 0, **config) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**config)


# -- host-sync guard -----------------------------------------------------------------------------

_HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
               torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero,
               torch.Tensor.numpy, torch.Tensor.cpu}


class NoReadTensor(torch.Tensor):
    """A tensor whose value may not reach the host (.item(), bool(), float(), int(), tolist(), nonzero,
    numpy(), cpu() raise)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            raise RuntimeError(f"host sync via {getattr(func, '__name__', func)} on the step path")
        return super().__torch_function__(func, types, args, kwargs or {})


def guarded(x):
    """``x`` as a :class:`NoReadTensor` (anything but a tensor is returned as is)."""
    return x.as_subclass(NoReadTensor) if isinstance(x, torch.Tensor) else x


def plain(x: torch.Tensor) -> torch.Tensor:
    """A guarded tensor as an ordinary one again."""
    return x.as_subclass(torch.Tensor)
