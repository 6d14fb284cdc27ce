"""torch's layers, made cheap to build when their weights are about to be assigned.

Each class here is the torch layer of the same name (``isinstance(layer, nn.Linear)`` holds, the
parameters and state-dict keys are the same, and a plain build initialises exactly as torch does,
same random draws). Inside :func:`building_for_load` (what ``skip_init`` uses) they instead make
their parameters on the given device (e.g. ``"meta"``) and skip ``reset_parameters``. The switch is
a context variable: per thread and per task, no patch of torch, and no torch function mode that every
tensor operation of a model's construction would pass through.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
from torch import nn


class _LoadBuild:
    """The active :func:`building_for_load` block: the device parameters are made on (None: torch's default)."""

    __slots__ = ("device",)

    def __init__(self, device: str | torch.device | None) -> None:
        self.device = device


_LOAD_BUILD: ContextVar[_LoadBuild | None] = ContextVar("diffusekit_load_build", default=None)


@contextlib.contextmanager
def building_for_load(device: str | torch.device | None = None):
    """Layers from this module built inside skip initialisation and make their tensors on ``device``."""
    token = _LOAD_BUILD.set(_LoadBuild(device))
    try:
        yield
    finally:
        _LOAD_BUILD.reset(token)


class _SkipsInitWhenLoading:
    """Mixed in before a torch layer: the device and the init skip of :func:`building_for_load`."""

    def __init__(self, *args, **kwargs) -> None:
        build = _LOAD_BUILD.get()
        if build is not None and build.device is not None and kwargs.get("device") is None:
            kwargs["device"] = build.device
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        if _LOAD_BUILD.get() is None:
            super().reset_parameters()


class Linear(_SkipsInitWhenLoading, nn.Linear):
    pass


class Conv1d(_SkipsInitWhenLoading, nn.Conv1d):
    pass


class Conv2d(_SkipsInitWhenLoading, nn.Conv2d):
    pass


class ConvTranspose1d(_SkipsInitWhenLoading, nn.ConvTranspose1d):
    pass


class ConvTranspose2d(_SkipsInitWhenLoading, nn.ConvTranspose2d):
    pass


class GroupNorm(_SkipsInitWhenLoading, nn.GroupNorm):
    pass


class LayerNorm(_SkipsInitWhenLoading, nn.LayerNorm):
    pass


class RMSNorm(_SkipsInitWhenLoading, nn.RMSNorm):
    pass


class Embedding(_SkipsInitWhenLoading, nn.Embedding):
    pass


def loading() -> bool:
    """True inside :func:`building_for_load` (for a model's own initialisation code to skip)."""
    return _LOAD_BUILD.get() is not None


def load_device() -> str | torch.device | None:
    """The device of the active :func:`building_for_load` block (None outside one, or when not given)."""
    build = _LOAD_BUILD.get()
    return None if build is None else build.device
