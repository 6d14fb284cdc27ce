"""Layerwise casting: weights stored in a small dtype (``float8_e4m3fn``, ``bfloat16``), each layer
computing in ``compute_dtype`` (``model.enable_layerwise_casting``, the reference's API).

The weights of the Linear and (transposed) convolution layers are cast to ``storage_dtype`` once;
on every call a layer casts its weight and bias to ``compute_dtype`` for that call only (nothing
is written back to the module, so calls from several threads never see each other's casts). Layers
whose path matches a skip pattern (by default ``pos_embed``, ``patch_embed``, ``norm``, a top-level
``proj_in`` / ``proj_out``, and peft's LoRA sub-layers) or whose class is in
``skip_modules_classes`` keep their dtype. A cast layer's ``forward`` is the plain torch
computation: layers carrying diffusekit LoRA adapters (loaded from files) are skipped, and loading
such an adapter onto a cast layer afterwards raises.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_SKIP_MODULES_PATTERN = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
#: peft's adapter sub-layers (LoRA, LoHa, LoKr): they stay in the compute dtype
_ADAPTER_LAYER_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "hada_", "lokr_")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = {nn.ConvTranspose1d: (1, F.conv_transpose1d), nn.ConvTranspose2d: (2, F.conv_transpose2d),
               nn.ConvTranspose3d: (3, F.conv_transpose3d)}
_CASTABLE = (nn.Linear, *_CONVS, *_TRANSPOSED)


def enable_layerwise_casting(model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype,
                             skip_modules_pattern: tuple[str, ...] | None = None,
                             skip_modules_classes: tuple[type, ...] | None = None) -> None:
    """Store ``model``'s castable layers in ``storage_dtype``; see the module docstring."""
    patterns = tuple(skip_modules_pattern) if skip_modules_pattern is not None else (
        DEFAULT_SKIP_MODULES_PATTERN + _ADAPTER_LAYER_NAMES)
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    classes = tuple(skip_modules_classes or ())
    for name, module in _castable_layers(model, "", patterns, classes):
        if getattr(module, "lora_adapters", None):
            logger.info("layerwise casting: %s carries LoRA adapters; it keeps its dtype", name)
            continue
        module.to(dtype=storage_dtype)
        module.forward = _cast_forward(module, compute_dtype)


def _castable_layers(module: nn.Module, prefix: str, patterns: tuple[str, ...], classes: tuple[type, ...]):
    """(path, layer) of the castable layers under ``module``, not descending into skipped paths."""
    if isinstance(module, classes) or any(re.search(p, prefix) for p in patterns):
        return
    if isinstance(module, _CASTABLE):
        yield prefix, module
        return
    for name, child in module.named_children():
        yield from _castable_layers(child, f"{prefix}.{name}" if prefix else name, patterns, classes)


def _cast_forward(layer: nn.Module, compute_dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    compute = _computation(layer)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(layer, "lora_active", ()):
            raise ValueError(f"{type(layer).__name__}: LoRA adapters on a layer with layerwise casting are not "
                             "supported; load LoRAs before enable_layerwise_casting")
        bias = None if layer.bias is None else layer.bias.to(compute_dtype)
        return compute(x, layer.weight.to(compute_dtype), bias, *args, **kwargs)

    return forward


def _computation(layer: nn.Module) -> Callable[..., torch.Tensor]:
    """``compute(x, weight, bias, ...)``: the layer's torch computation with the given weight and bias."""
    if isinstance(layer, nn.Linear):
        return F.linear
    if isinstance(layer, _CONVS):
        return layer._conv_forward
    for kind, (dims, function) in _TRANSPOSED.items():
        if isinstance(layer, kind):
            return lambda x, weight, bias, output_size=None: function(
                x, weight, bias, layer.stride, layer.padding, _output_padding(layer, x, output_size, dims),
                layer.groups, layer.dilation)
    raise TypeError(f"layerwise casting: no computation for {type(layer).__name__}")


def _output_padding(layer: nn.Module, x: torch.Tensor, output_size: Any, dims: int) -> Any:
    if layer.padding_mode != "zeros":
        raise ValueError(f"{type(layer).__name__}: only zeros padding is supported with layerwise casting")
    return layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size, dims,
                                 layer.dilation)
