"""The reference's attention-processor API: each attention layer calls its ``processor`` to compute.

A processor is a callable ``processor(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, **kwargs)``; ``attn`` is the attention layer (``Attention`` or
``FluxAttention``), whose ``attend`` method is the default computation. Write a processor to
change the computation (custom attention, logging, masks) and install it with
``model.set_attn_processor(processor)`` (one for every layer) or a dict keyed like
``model.attn_processors`` (``"<layer path>.processor"``).

Processors are plain objects, not modules: they add nothing to the state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class AttnProcessor2_0:
    """The default processor: the layer's own computation, through ``scaled_dot_product_attention``."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        return attn.attend(hidden_states, encoder_hidden_states=encoder_hidden_states,
                           attention_mask=attention_mask, **kwargs)


class AttnProcessor(AttnProcessor2_0):
    """The reference's classic processor. Here it computes exactly as :class:`AttnProcessor2_0`
    (one attention computation in this library); the class exists so code naming it keeps working."""


class ProcessorHolder:
    """Mixed into an attention layer: the ``processor`` it calls, with ``set_processor`` / ``get_processor``."""

    processor: Any

    def set_processor(self, processor: Any) -> None:
        """Compute with ``processor`` from now on."""
        if not callable(processor):
            raise ValueError(f"an attention processor must be callable, got {type(processor).__name__}")
        self.processor = processor

    def get_processor(self, return_deprecated_lora: bool = False) -> Any:
        return self.processor


class AttentionProcessorMixin:
    """Model-level access to the processors of every attention layer (``attn_processors``,
    ``set_attn_processor``, ``set_default_attn_processor``), as the reference's models have."""

    def _attention_layers(self) -> dict[str, ProcessorHolder]:
        return {f"{name}.processor": module for name, module in self.named_modules()
                if isinstance(module, ProcessorHolder)}

    @property
    def attn_processors(self) -> dict[str, Any]:
        """``{"<layer path>.processor": processor}`` for every attention layer, in module order."""
        return {key: layer.get_processor() for key, layer in self._attention_layers().items()}

    def set_attn_processor(self, processor: Any) -> None:
        """Install one processor on every attention layer, or a dict keyed like ``attn_processors``."""
        layers = self._attention_layers()
        if isinstance(processor, dict):
            if len(processor) != len(layers):
                raise ValueError(
                    f"A dict of processors was passed, but the number of processors {len(processor)} does not match "
                    f"the number of attention layers: {len(layers)}. Please make sure to pass {len(layers)} "
                    "processor classes.")
            unknown = sorted(set(processor) - set(layers))
            if unknown:
                raise ValueError(f"set_attn_processor: no attention layer {unknown[0]!r} (keys as in attn_processors)")
        for key, layer in layers.items():
            layer.set_processor(processor[key] if isinstance(processor, dict) else processor)

    def set_default_attn_processor(self) -> None:
        """Back to the default computation on every attention layer."""
        self.set_attn_processor(AttnProcessor())
