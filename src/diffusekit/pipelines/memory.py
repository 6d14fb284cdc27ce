"""Memory switches for the latent-diffusion pipelines: attention slicing, VAE slicing and tiling,
and model CPU offload (each model on the accelerator only while it runs).

:class:`MemoryMixin` is mixed into a :class:`~diffusekit.pipelines.pipeline_utils.DiffusionPipeline`
subclass. Pipelines put their noise and prompt tensors on ``self._execution_device`` and call
``self.maybe_free_model_hooks()`` at the end of ``__call__``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Model methods besides ``forward`` that run the model (the VAE's encoder and decoder).
_ENTRY_METHODS = ("encode", "decode")


def move_module(module: nn.Module, device: torch.device | str) -> None:
    """Move a model between devices (one place, so tests can record the moves)."""
    module.to(device)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class ModelOffloader:
    """Keeps at most one of its models on ``device``.

    A model moves to ``device`` when its ``forward`` (or ``encode`` / ``decode``) is called, and the
    model that ran before it goes back to the CPU first. Tensor arguments follow the model.
    """

    def __init__(self, device: torch.device, models: list[nn.Module]):
        self.device = device
        self.models = list(models)
        self.active: nn.Module | None = None
        self._handles = []
        for model in self.models:
            move_module(model, "cpu")
            self._attach(model)

    def _attach(self, model: nn.Module) -> None:
        def pre_forward(module, args, kwargs):
            self.onload(module)
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        self._handles.append(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
        for name in _ENTRY_METHODS:
            method = getattr(model, name, None)
            if callable(method) and name not in model.__dict__:
                model.__dict__[name] = self._wrap(model, method)

    def _wrap(self, model: nn.Module, method):
        def run(*args, **kwargs):
            self.onload(model)
            return method(*_to_device(args, self.device), **_to_device(kwargs, self.device))

        run.__wrapped__ = method
        run.__doc__ = method.__doc__
        return run

    def onload(self, model: nn.Module) -> None:
        """Put ``model`` on the device, sending the previously active model back to the CPU."""
        if self.active is model:
            return
        self.offload()
        move_module(model, self.device)
        self.active = model

    def offload(self) -> None:
        """Send the active model (if any) back to the CPU."""
        if self.active is not None:
            move_module(self.active, "cpu")
            self.active = None
            if self.device.type == "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()

    def remove(self) -> None:
        """Detach the hooks; the models stay where they are."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for model in self.models:
            for name in _ENTRY_METHODS:
                if getattr(model.__dict__.get(name), "__wrapped__", None) is not None:
                    del model.__dict__[name]


def default_accelerator() -> str:
    """The accelerator type to offload to: cuda, xpu or mps, whichever is present."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    raise RuntimeError("enable_model_cpu_offload needs an accelerator, and none was found; pass device=...")


class MemoryMixin:
    """VAE slicing/tiling and model CPU offload for pipelines with a UNet and a VAE (attention slicing is on
    every pipeline: ``DiffusionPipeline.enable_attention_slicing``)."""

    #: Models in the order they run; any other model component is offloaded after them.
    model_cpu_offload_seq: str = "text_encoder->unet->vae"
    #: Model components kept on the accelerator instead of being offloaded.
    _exclude_from_cpu_offload: tuple[str, ...] = ()

    # -- VAE ------------------------------------------------------------------------------------

    def _vae(self) -> nn.Module:
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ValueError(f"{type(self).__name__} has no vae to slice or tile")
        return vae

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time."""
        self._vae().enable_slicing()

    def disable_vae_slicing(self) -> None:
        self._vae().disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode and decode large images tile by tile."""
        self._vae().enable_tiling()

    def disable_vae_tiling(self) -> None:
        self._vae().disable_tiling()

    # -- model CPU offload ----------------------------------------------------------------------

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the models on the CPU and move each to the accelerator only while it runs.

        ``device`` is the accelerator (default: the one present, e.g. ``"cuda"``) and ``gpu_id`` its
        index (default 0). Only one model is on the accelerator at a time.
        """
        target = torch.device(device if device is not None else default_accelerator())
        if gpu_id is not None and target.index is not None:
            raise ValueError(f"pass gpu_id or a device with an index, not both (gpu_id={gpu_id}, device={device})")
        index = gpu_id if gpu_id is not None else (target.index or 0)
        target = torch.device(target.type, index)

        self.remove_all_hooks()
        models = {n: c for n, c in self.components.items() if isinstance(c, nn.Module)}
        ordered = [n for n in self.model_cpu_offload_seq.split("->") if n in models]
        ordered += [n for n in models if n not in ordered and n not in self._exclude_from_cpu_offload]
        for name in self._exclude_from_cpu_offload:
            if name in models:
                move_module(models[name], target)
        self._offloader = ModelOffloader(target, [models[n] for n in ordered])

    def remove_all_hooks(self) -> None:
        """Turn model CPU offload off (the models stay where they are)."""
        offloader = getattr(self, "_offloader", None)
        if offloader is not None:
            offloader.remove()
            self._offloader = None

    def maybe_free_model_hooks(self) -> None:
        """End of a call: with offload on, send the last model that ran back to the CPU."""
        offloader = getattr(self, "_offloader", None)
        if offloader is not None:
            offloader.offload()

    @property
    def _execution_device(self) -> torch.device:
        """Where the models run: the offload accelerator when offload is on, else the pipeline's device."""
        offloader = getattr(self, "_offloader", None)
        return offloader.device if offloader is not None else self.device
