"""The reference's attention-processor API: each attention layer calls its ``processor`` to compute.

A processor is a callable ``processor(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, **kwargs)``; ``attn`` is the attention layer (``Attention`` or
``FluxAttention``), whose ``attend`` method is the default computation. Write a processor to
change the computation (custom attention, logging, masks) and install it with
``model.set_attn_processor(processor)`` (one for every layer) or a dict keyed like
``model.attn_processors`` (``"<layer path>.processor"``).

Processors are plain objects, not modules: they add nothing to the state dict; the exception is
:class:`IPAdapterAttnProcessor2_0`, whose image key/value projections are UNet weights.

A processor gets only the keyword arguments its signature names (unless it takes ``**kwargs``):
``temb`` and ``cross_attention_kwargs`` entries it does not name are dropped, the latter with a
warning, as the reference does. Processors written against the reference's ``Attention`` helpers
(``prepare_attention_mask``, ``head_to_batch_dim``, ``get_attention_scores``, ``batch_to_head_dim``)
work on :class:`~diffusekit.models.attention.Attention` (:class:`ClassicAttentionHelpers`).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear

logger = logging.getLogger(__name__)

#: keyword arguments dropped without a warning when a processor does not name them
_QUIET_KEYWORDS = frozenset({"temb", "ip_adapter_masks", "ip_hidden_states"})


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


class IPAdapterAttnProcessor2_0(nn.Module):
    """Cross-attention with IP-Adapter image tokens: the text attention plus, per loaded adapter,
    ``scale`` times the attention of the same queries over the adapter's image tokens (keys and
    values from ``to_k_ip.{i}`` / ``to_v_ip.{i}``). ``encoder_hidden_states`` is the UNet's pair
    ``(text states, [image tokens per adapter])``. A module: its weights are in the UNet's state dict.
    ``scale`` (one per adapter) is set by ``set_ip_adapter_scale``; 0 skips that adapter.
    ``ip_adapter_masks`` (a ``cross_attention_kwargs`` entry): one (1, images, H, W) mask or None per
    adapter; each image then attends on its own and its output is weighted by its mask (resized to the
    layer's queries, :func:`ip_mask_weights`), so an image prompt acts only where its mask is."""

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None,
                 num_tokens: int | tuple[int, ...] | list[int] = (4,), scale: float | list[float] = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim or hidden_size
        self.num_tokens = list(num_tokens) if isinstance(num_tokens, (tuple, list)) else [num_tokens]
        self.scale = list(scale) if isinstance(scale, list) else [scale] * len(self.num_tokens)
        if len(self.scale) != len(self.num_tokens):
            raise ValueError("`scale` should be a list of integers with the same length as `num_tokens`.")
        self.to_k_ip = nn.ModuleList(Linear(self.cross_attention_dim, hidden_size, bias=False)
                                     for _ in self.num_tokens)
        self.to_v_ip = nn.ModuleList(Linear(self.cross_attention_dim, hidden_size, bias=False)
                                     for _ in self.num_tokens)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                ip_adapter_masks: Any = None, **kwargs: Any) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("this UNet has an IP-Adapter loaded: its cross-attention needs image tokens (call the "
                             "pipeline with ip_adapter_image or ip_adapter_image_embeds, or unload_ip_adapter())")
        text_states, image_tokens = encoder_hidden_states
        masks = ip_masks_per_adapter(ip_adapter_masks, image_tokens)

        def add_image_attention(query: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            batch, heads, _, head_dim = query.shape
            for tokens, scale, to_k, to_v, mask in zip(image_tokens, self.scale, self.to_k_ip, self.to_v_ip, masks):
                if scale == 0:
                    continue
                # with a mask, each image attends on its own and is weighted by its mask
                per_image = [tokens] if mask is None else [tokens[:, i] for i in range(mask.shape[1])]
                for i, image in enumerate(per_image):
                    key, value = (proj(image).view(batch, -1, heads, head_dim).transpose(1, 2) for proj in (to_k, to_v))
                    image_out = attn._attend(query, key, value, None)
                    image_out = image_out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
                    if mask is not None:
                        image_out = image_out * ip_mask_weights(mask[:, i], batch, image_out.shape[1]).to(image_out)
                    out = out + scale * image_out
            return out

        return attn.attend(hidden_states, text_states, attention_mask, extra_attention=add_image_attention, **kwargs)


def ip_masks_per_adapter(masks: Any, image_tokens: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``ip_adapter_masks`` (one (1, images, H, W) tensor or None per adapter; a tensor (adapters, 1, H, W)
    is one mask per adapter) checked against the adapters' image tokens; all None when not given."""
    if masks is None:
        return [None] * len(image_tokens)
    if isinstance(masks, torch.Tensor):
        masks = list(masks.unsqueeze(1))
    if len(masks) != len(image_tokens):
        raise ValueError(f"ip_adapter_masks has {len(masks)} masks for {len(image_tokens)} loaded IP-Adapters; "
                         "pass one per adapter (None for an adapter without mask)")
    for index, (mask, tokens) in enumerate(zip(masks, image_tokens)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise ValueError(f"ip_adapter_masks[{index}] must be a tensor (1, images, height, width), got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        if tokens.ndim != 4 or mask.shape[1] != tokens.shape[1]:
            images = tokens.shape[1] if tokens.ndim == 4 else 1
            raise ValueError(f"ip_adapter_masks[{index}] has {mask.shape[1]} masks but the adapter has {images} "
                             "images")
    return list(masks)


def ip_mask_weights(mask: torch.Tensor, batch: int, num_queries: int) -> torch.Tensor:
    """One image's IP-Adapter mask (N, H, W) as weights (batch, num_queries, 1) of the attention's
    queries: resized bicubically to a grid of about ``num_queries`` cells with the mask's aspect
    ratio, flattened, and padded with zeros or cut (with a warning) where the grid does not have
    exactly ``num_queries`` cells, as the reference's ``IPAdapterMaskProcessor.downsample``."""
    height, width = mask.shape[-2:]
    rows = max(int(math.sqrt(num_queries * height / width)), 1)
    rows += int(num_queries % rows != 0)
    cols = num_queries // rows
    weights = F.interpolate(mask[None], size=(rows, cols), mode="bicubic")[0]
    if weights.shape[0] < batch:
        weights = weights.repeat(batch, 1, 1)
    weights = weights.reshape(weights.shape[0], -1)
    if rows * cols != num_queries:
        warnings.warn("The aspect ratio of the IP-Adapter mask does not match the aspect ratio of the output image; "
                      "the mask is padded or cut to fit", UserWarning, stacklevel=2)
        weights = F.pad(weights, (0, num_queries - weights.shape[1])) if weights.shape[1] < num_queries \
            else weights[:, :num_queries]
    return weights[..., None]


class ProcessorHolder:
    """Mixed into an attention layer: the ``processor`` it calls, with ``set_processor`` / ``get_processor``."""

    processor: Any

    def call_processor(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        """``processor(self, hidden_states, **kwargs)`` with only the keywords the processor takes."""
        processor = self.processor
        if type(processor) not in _TAKE_ANY_KEYWORD:
            kwargs = _keywords_taken(processor, kwargs)
        return processor(self, hidden_states, **kwargs)

    def set_processor(self, processor: Any) -> None:
        """Compute with ``processor`` from now on."""
        if not callable(processor):
            raise ValueError(f"an attention processor must be callable, got {type(processor).__name__}")
        modules = getattr(self, "_modules", {})
        if "processor" in modules and not isinstance(processor, nn.Module):
            del modules["processor"]  # a processor with weights (IP-Adapter) was a submodule
        self.processor = processor

    def get_processor(self, return_deprecated_lora: bool = False) -> Any:
        return self.processor


_TAKE_ANY_KEYWORD = (AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0)


def _keywords_taken(processor: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less those ``processor``'s signature does not name (all kept for ``**kwargs``)."""
    plain_module = isinstance(processor, nn.Module) and type(processor).__call__ is nn.Module.__call__
    call = processor.forward if plain_module else processor
    parameters = inspect.signature(call).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    unused = [k for k, v in kwargs.items() if k not in parameters and k not in _QUIET_KEYWORDS and v is not None]
    if unused:
        logger.warning("cross_attention_kwargs %s are not expected by %s and will be ignored.", unused,
                       type(processor).__name__)
    return {k: v for k, v in kwargs.items() if k in parameters}


class ClassicAttentionHelpers:
    """The reference's ``Attention`` helpers that hand-written processors call: masks per head,
    heads folded into the batch and back, and the attention probabilities (``baddbmm`` + softmax)."""

    heads: int
    scale: float
    upcast_attention: bool = False
    upcast_softmax: bool = False
    norm_cross = None  # no cross-attention norm in this library

    def prepare_attention_mask(self, attention_mask: torch.Tensor | None, target_length: int, batch_size: int,
                               out_dim: int = 3) -> torch.Tensor | None:
        """An additive mask with one row per (batch, head): ``(batch * heads, q, k)`` for ``out_dim=3``,
        ``(batch, heads, q, k)`` for ``out_dim=4``; padded with zeros when its key length is not
        ``target_length`` (the reference pads by ``target_length``, kept for equal results)."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * self.heads:
                attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)
            return attention_mask
        if out_dim == 4:
            return attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)
        raise ValueError(f"prepare_attention_mask: out_dim must be 3 or 4, got {out_dim}")

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """``(batch, seq, heads * dim)`` -> ``(batch * heads, seq, dim)`` (``out_dim=4``: ``(batch, heads, seq, dim)``)."""
        if tensor.ndim == 3:
            batch, seq, width = tensor.shape
            extra = 1
        else:
            batch, extra, seq, width = tensor.shape
        tensor = tensor.reshape(batch, seq * extra, self.heads, width // self.heads).permute(0, 2, 1, 3)
        if out_dim == 3:
            return tensor.reshape(batch * self.heads, seq * extra, width // self.heads)
        return tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(batch * heads, seq, dim)`` -> ``(batch, seq, heads * dim)``."""
        rows, seq, dim = tensor.shape
        tensor = tensor.reshape(rows // self.heads, self.heads, seq, dim).permute(0, 2, 1, 3)
        return tensor.reshape(rows // self.heads, seq, dim * self.heads)

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``softmax(scale * query @ key^T + mask)`` for heads folded into the batch, in query's dtype
        (computed in float32 when the layer upcasts)."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            start = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
            beta = 0
        else:
            start, beta = attention_mask, 1
        scores = torch.baddbmm(start, query, key.transpose(-1, -2), beta=beta, alpha=self.scale)
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)


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

    def fuse_qkv_projections(self) -> None:
        """Fuse each attention layer's q/k/v (or k/v) projections into one matmul."""
        for layer in self._attention_layers().values():
            layer.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for layer in self._attention_layers().values():
            layer.unfuse_projections()
