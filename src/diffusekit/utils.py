"""Small shared pieces: output containers and seeded noise."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Sequence

import torch


class BaseOutput(OrderedDict):
    """Base of the output dataclasses: an ordered mapping of the fields that are not None, and a tuple.

    ``out.sample``, ``out["sample"]`` and ``out[0]`` are the same value; ``out.keys()``,
    ``out.values()``, ``out.items()`` and ``out.to_tuple()`` skip None fields. Setting a field's
    attribute or key updates both. Keys cannot be removed or merged in (``del``, ``pop``,
    ``update``, ``setdefault``). Subclasses are torch pytree nodes (DDP, ``torch.compile``).
    Built with one dict as the only argument, its entries become the keys (as accelerate does).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_pytree_node(cls)

    def __post_init__(self) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        if not names:
            raise ValueError(f"{type(self).__name__} has no fields")
        first = getattr(self, names[0])
        if isinstance(first, dict) and all(getattr(self, n) is None for n in names[1:]):
            entries = first.items()
        else:
            entries = ((n, getattr(self, n)) for n in names)
        for key, value in entries:
            if value is not None:
                self[key] = value

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not None and name in self:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"a {type(self).__name__} cannot remove or merge in keys; build a new one instead")

    __delitem__ = setdefault = pop = popitem = update = clear = _refuse

    def __reduce__(self):
        values = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
        return type(self), values, dict(self.__dict__)

    def to_tuple(self) -> tuple:
        """The values that are not None, in field order."""
        return tuple(self.values())


def _register_pytree_node(cls: type) -> None:
    """Let torch's pytree utilities see through an output class (flattened to its values, keyed by name)."""
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(
        cls,
        lambda out: (list(out.values()), list(out.keys())),
        lambda values, keys: cls(**dict(zip(keys, values))),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
    )


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


def numpy_to_pil(images: Any) -> list:
    """Images in [0, 1], shaped (N, H, W, C) or (H, W, C), as PIL images (``diffusers.utils.numpy_to_pil``)."""
    from .pipelines.image_processing import numpy_to_pil as convert

    return convert(images)


def pt_to_pil(images: torch.Tensor) -> list:
    """A (N, C, H, W) batch in [-1, 1] as PIL images (``diffusers.utils.pt_to_pil``)."""
    from .pipelines.image_processing import postprocess_images

    return postprocess_images(images, output_type="pil")
