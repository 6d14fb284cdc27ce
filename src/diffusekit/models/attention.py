"""Attention layers shared by the UNets and autoencoders.

- :class:`Attention` (keys ``group_norm, to_q, to_k, to_v, to_out.0``): multi-head attention through
  ``torch.nn.functional.scaled_dot_product_attention``. On 4-D input ``(B, C, H, W)`` it attends over
  the pixels and returns the same shape (the VAE and pixel-space UNet blocks use it as
  ``Attention(ch, heads=ch // head_dim, dim_head=head_dim, norm_num_groups=g, eps=eps,
  residual_connection=True, bias=True, upcast_softmax=True, rescale_output_factor=s)``).
  Call ``attn(x, encoder_hidden_states=None, attention_mask=None)``; extra keyword arguments from
  ``cross_attention_kwargs`` (such as ``scale``) are accepted and ignored. ``slice_size`` (set by
  :meth:`Attention.set_attention_slice`) computes the heads in chunks to save memory;
  :meth:`Attention.fuse_projections` fuses q/k/v into one matmul.
- :class:`FeedForward` (``net.0.proj``, ``net.2``) with :class:`GEGLU` / :class:`GELU` input layers.
- :class:`BasicTransformerBlock` (``norm1, attn1, norm2, attn2, norm3, ff``): self-attn, cross-attn, MLP.
- :class:`Transformer2DModel` (``norm, proj_in, transformer_blocks, proj_out``): the spatial
  transformer of Stable Diffusion for continuous ``(B, C, H, W)`` inputs, with a residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import BaseOutput
from .attention_processor import AttnProcessor2_0, ClassicAttentionHelpers, ProcessorHolder
from .layers import Conv2d, GroupNorm, LayerNorm, Linear
from .modeling import maybe_checkpoint

#: Attention parameter names of checkpoints saved before diffusers 0.14 (e.g. google/ddpm-*).
LEGACY_ATTENTION_RENAMES = (
    (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."),
)


class Attention(ProcessorHolder, ClassicAttentionHelpers, nn.Module):
    """Multi-head (self or cross) attention; see the module docstring for the arguments in use.

    ``forward`` calls ``self.processor`` (see :mod:`.attention_processor`); :meth:`attend` is the default computation."""

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        norm_num_groups: int | None = None,
        out_bias: bool = True,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        out_dim: int | None = None,
        spatial_norm_dim: int | None = None,
        cross_attention_norm: str | None = None,
    ):
        super().__init__()
        if spatial_norm_dim is not None or cross_attention_norm is not None:
            raise ValueError("spatial_norm_dim and cross_attention_norm are not supported")
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.heads = out_dim // dim_head if out_dim is not None else heads
        self.query_dim = query_dim
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.use_bias = bias
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.scale = dim_head**-0.5
        self.sliceable_head_dim = heads
        self.slice_size: int | None = None
        self.fused_projections = False

        self.group_norm = (
            GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
            if norm_num_groups is not None else None
        )
        self.to_q = Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_v = Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(self.inner_dim, out_dim or query_dim, bias=out_bias),
                                     nn.Dropout(dropout)])
        self.processor = AttnProcessor2_0()

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute attention ``slice_size`` (batch x head) rows at a time; ``None`` turns slicing off."""
        if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
            raise ValueError(f"slice_size must be a positive int or None, got {slice_size!r}")
        self.slice_size = slice_size

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """Concatenate q/k/v (self-attention) or k/v (cross-attention) weights into one linear layer."""
        parts = [self.to_k, self.to_v] if self.is_cross_attention else [self.to_q, self.to_k, self.to_v]
        weight = torch.cat([p.weight for p in parts])
        fused = Linear(weight.shape[1], weight.shape[0], bias=self.use_bias,
                          device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        if self.use_bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        setattr(self, "to_kv" if self.is_cross_attention else "to_qkv", fused)
        self.fused_projections = fuse

    def unfuse_projections(self) -> None:
        for name in ("to_qkv", "to_kv"):
            if hasattr(self, name):
                delattr(self, name)
        self.fused_projections = False

    def _project(self, hidden_states: torch.Tensor, context: torch.Tensor | None):
        if self.fused_projections and not self.is_cross_attention and context is None:
            return self.to_qkv(hidden_states).chunk(3, dim=-1)
        context = hidden_states if context is None else context
        query = self.to_q(hidden_states)
        if self.fused_projections and self.is_cross_attention:
            key, value = self.to_kv(context).chunk(2, dim=-1)
        else:
            key, value = self.to_k(context), self.to_v(context)
        return query, key, value

    def _prepare_mask(self, mask: torch.Tensor | None, key_len: int, batch: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape[-1] != key_len:
            mask = F.pad(mask, (0, key_len), value=0.0)
        if mask.ndim == 2:
            mask = mask[:, None]
        if mask.shape[0] == batch * self.heads:  # already repeated per head
            return mask.reshape(batch, self.heads, -1, mask.shape[-1])
        return mask[:, None]

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        if self.slice_size is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        batch, heads = query.shape[:2]
        query, key, value = (t.flatten(0, 1) for t in (query, key, value))
        if mask is not None:
            mask = mask.expand(batch, heads, *mask.shape[2:]).flatten(0, 1)
        chunks = [
            F.scaled_dot_product_attention(query[rows], key[rows], value[rows],
                                           attn_mask=None if mask is None else mask[rows])
            for rows in (slice(i, i + self.slice_size) for i in range(0, batch * heads, self.slice_size))
        ]
        out = torch.cat(chunks)
        return out.reshape(batch, heads, *out.shape[1:])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        return self.call_processor(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=attention_mask, temb=temb, **cross_attention_kwargs)

    def attend(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, extra_attention: Callable | None = None,
               **cross_attention_kwargs: Any) -> torch.Tensor:
        """The default computation (:class:`AttnProcessor2_0`); extra keyword arguments are ignored.
        ``extra_attention(query, out)`` (query per head, out before ``to_out``) may add to the output
        (IP-Adapter's image attention)."""
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = self._project(hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // self.heads
        query, key, value = (t.view(batch, -1, self.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        mask = self._prepare_mask(attention_mask, key.shape[2], batch)
        out = self._attend(query, key, value, mask)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim).to(query.dtype)
        if extra_attention is not None:
            out = extra_attention(query, out)
        out = self.to_out[1](self.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape[0], -1, *image_shape[2:])
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GELU(nn.Module):
    """``gelu(proj(x))`` (``approximate="tanh"`` for the tanh form)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: ``proj`` gives ``[x, gate]``; returns ``x * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [act_in (GEGLU/GELU), Dropout, Linear]`` with hidden size ``inner_dim or dim * mult``."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        inner_dim = inner_dim or int(dim * mult)
        if activation_fn == "geglu":
            act: nn.Module = GEGLU(dim, inner_dim, bias=bias)
        elif activation_fn in ("gelu", "gelu-approximate"):
            act = GELU(dim, inner_dim, approximate="tanh" if activation_fn == "gelu-approximate" else "none", bias=bias)
        else:
            raise ValueError(f"activation_fn {activation_fn!r} is not supported (geglu, gelu, gelu-approximate)")
        net = [act, nn.Dropout(dropout), Linear(inner_dim, dim_out or dim, bias=bias)]
        if final_dropout:
            net.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(net)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """LayerNorm'd self-attention, cross-attention (when ``cross_attention_dim``) and feed-forward, each residual.

    ``only_cross_attention`` makes ``attn1`` attend to the encoder states too.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        final_dropout: bool = False,
        ff_inner_dim: int | None = None,
        ff_bias: bool = True,
        attention_out_bias: bool = True,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attn_kwargs = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                           bias=attention_bias, upcast_attention=upcast_attention, out_bias=attention_out_bias)
        self.norm1 = LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attn_kwargs)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = LayerNorm(dim, norm_eps, norm_elementwise_affine)
            self.attn2 = Attention(dim, cross_attention_dim=None if double_self_attention else cross_attention_dim,
                                   **attn_kwargs)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = LayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout,
                              inner_dim=ff_inner_dim, bias=ff_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        extra = dict(cross_attention_kwargs or {})
        hidden_states = hidden_states + self.attn1(
            self.norm1(hidden_states),
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask, **extra)
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask, **extra)
        return hidden_states + self.ff(self.norm3(hidden_states))


@dataclass
class Transformer2DModelOutput(BaseOutput):
    sample: torch.Tensor


class Transformer2DModel(nn.Module):
    """Spatial transformer on ``(B, C, H, W)``: GroupNorm, ``proj_in`` (1x1 conv or linear), blocks, ``proj_out``, residual."""

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        if in_channels is None:
            raise ValueError("in_channels is required (only continuous inputs are supported)")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner_dim)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(
                inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                attention_bias=attention_bias, only_cross_attention=only_cross_attention,
                double_self_attention=double_self_attention, upcast_attention=upcast_attention,
                norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        ])
        if use_linear_projection:
            self.proj_out = Linear(inner_dim, out_channels)
        else:
            self.proj_out = Conv2d(inner_dim, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        attention_mask = _mask_to_bias(attention_mask, hidden_states.dtype)
        encoder_attention_mask = _mask_to_bias(encoder_attention_mask, hidden_states.dtype)
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = maybe_checkpoint(self, block, hidden_states, attention_mask, encoder_hidden_states,
                                             encoder_attention_mask, cross_attention_kwargs)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        output = hidden_states + residual
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``(batch, keys)`` keep-mask (1 keep, 0 drop) -> additive ``(batch, 1, keys)`` bias; others unchanged."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
