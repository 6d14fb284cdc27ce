"""Small shared pieces: output containers and seeded noise."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch


class BaseOutput:
    """Base of the output dataclasses: fields by name (``out.sample``), by key or by position (``out[0]``)."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


Generator = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise drawn exactly as the reference draws it.

    A list of generators draws one batch item from each, in order. A CPU generator used for a
    tensor on another device draws on the CPU and moves the result, so a seed gives the same
    noise everywhere.
    """
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    draw_device = device
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, (list, tuple)) else generator).device
        if gen_device.type != device.type:
            if gen_device.type != "cpu":
                raise ValueError(f"a generator on {gen_device} cannot make noise for a tensor on {device}")
            draw_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        item_shape = (1, *shape[1:])
        parts = [torch.randn(item_shape, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)
