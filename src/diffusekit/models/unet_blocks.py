"""Down, mid and up blocks of the 2-D UNets and autoencoders, under the reference's block type names.

Build one with ``get_down_block(type_name, ...)``, ``get_mid_block(...)`` or ``get_up_block(type_name, ...)``
(the reference's keyword arguments) or with the class directly. Module attribute names follow the
reference checkpoints: ``resnets.{i}``, ``attentions.{i}``, ``downsamplers.0.conv``, ``upsamplers.0.conv``,
and for the NCSN++ skip blocks ``resnet_down`` / ``resnet_up``, ``skip_conv``, ``skip_norm``.

Call conventions (``temb`` is the time embedding ``(B, temb_channels)``):

- UNet down blocks: ``block(hidden_states, temb) -> (hidden_states, res_samples)``; cross-attention
  blocks (``has_cross_attention``) also take ``encoder_hidden_states, attention_mask,
  cross_attention_kwargs, encoder_attention_mask, additional_residuals``; skip blocks (with a
  ``skip_conv`` attribute) take and return ``skip_sample`` as a third value.
- UNet up blocks: ``block(hidden_states, res_hidden_states_tuple, temb, upsample_size=None)``
  (plus the cross-attention arguments); skip blocks ``block(h, res, temb, skip_sample) -> (h, skip_sample)``.
- VAE blocks: ``DownEncoderBlock2D`` / ``AttnDownEncoderBlock2D`` ``(h) -> h`` (no ``temb``; ``padding=0``
  downsampling pads right/bottom), ``UpDecoderBlock2D`` / ``AttnUpDecoderBlock2D`` ``(h, temb=None) -> h``.
- Mid blocks: ``UNetMidBlock2D(h, temb=None) -> h`` (``temb_channels=None`` for the VAE) and
  ``UNetMidBlock2DCrossAttn(h, temb, encoder_hidden_states, ...) -> h``.

Not provided: the ``spatial`` norm (MoVQ), dual/simple cross attention, K-diffusion and FreeU blocks.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .layers import Conv2d, GroupNorm
from .attention import Attention, Transformer2DModel
from .freeu import apply_freeu
from .modeling import maybe_checkpoint
from .resnet import Downsample2D, FirDownsample2D, FirUpsample2D, ResnetBlock2D, Upsample2D


# -- small builders -------------------------------------------------------------------------------

def _resnet(in_ch: int, out_ch: int, temb: int | None, eps: float, groups: int, dropout: float, shift: str,
            act: str, scale: float, **extra: Any) -> ResnetBlock2D:
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"resnet_time_scale_shift {shift!r} is not supported (default, scale_shift)")
    return ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb, eps=eps, groups=groups,
                         dropout=dropout, time_embedding_norm=shift, non_linearity=act,
                         output_scale_factor=scale, **extra)


def _pixel_attention(channels: int, head_dim: int | None, eps: float, groups: int | None,
                     scale: float) -> Attention:
    head_dim = head_dim or channels
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=scale,
                     eps=eps, norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True)


def _transformer(channels: int, heads: int, layers: int, cross_dim: int, groups: int, linear: bool,
                 only_cross: bool, upcast: bool) -> Transformer2DModel:
    return Transformer2DModel(heads, channels // heads, in_channels=channels, num_layers=layers,
                              cross_attention_dim=cross_dim, norm_num_groups=groups,
                              use_linear_projection=linear, only_cross_attention=only_cross,
                              upcast_attention=upcast)


def _interleaved(num_layers: int, make_resnet: Callable[[int], nn.Module],
                 make_attention: Callable[[int], nn.Module | None] | None = None,
                 ) -> tuple[nn.ModuleList, nn.ModuleList | None]:
    """(resnets, attentions or None) built layer by layer, each ResNet then its attention: the
    reference's creation order, so a seeded build draws the same initial weights."""
    resnets, attentions = [], []
    for i in range(num_layers):
        resnets.append(make_resnet(i))
        if make_attention is not None:
            attentions.append(make_attention(i))
    return nn.ModuleList(resnets), (nn.ModuleList(attentions) if make_attention is not None else None)


def _set_layers(block: nn.Module, resnets: nn.ModuleList, attentions: nn.ModuleList | None) -> None:
    """Register ``attentions`` (when given) before ``resnets``, the reference's state-dict order."""
    if attentions is not None:
        block.attentions = attentions
    block.resnets = resnets


def _per_layer(value: int | list[int], num_layers: int) -> list[int]:
    return [value] * num_layers if isinstance(value, int) else list(value)


def _conv_down(channels: int, padding: int) -> nn.ModuleList:
    return nn.ModuleList([Downsample2D(channels, use_conv=True, out_channels=channels, padding=padding, name="op")])


def _conv_up(channels: int) -> nn.ModuleList:
    return nn.ModuleList([Upsample2D(channels, use_conv=True, out_channels=channels)])


def _check_attention_type(attention_type: str, dual_cross_attention: bool) -> None:
    if attention_type != "default" or dual_cross_attention:
        raise ValueError("only attention_type='default' without dual_cross_attention is supported")


# -- down blocks ----------------------------------------------------------------------------------

class DownBlock2D(nn.Module):
    """ResNets, then an optional strided-conv downsampler (``downsample_type="resnet"``: a down ResNet).

    ``make_attention(i)`` (for the subclasses) builds the attention after ResNet ``i``."""

    has_cross_attention = False
    with_attention = False
    #: Whether the block takes ``gradient_checkpointing`` (the reference's VAE blocks do not).
    checkpointable = True

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int | None, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1,
                 attention_head_dim: int | None = None, downsample_type: str | None = "conv",
                 make_attention: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if self.checkpointable:
            self.gradient_checkpointing = False
        args = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn,
                output_scale_factor)
        if make_attention is None and self.with_attention:
            def make_attention(i: int) -> nn.Module:
                return _pixel_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups,
                                        output_scale_factor)
        _set_layers(self, *_interleaved(
            num_layers, lambda i: _resnet(in_channels if i == 0 else out_channels, out_channels, *args),
            make_attention))
        self.downsample_type = downsample_type if add_downsample else None
        if self.downsample_type == "conv":
            self.downsamplers = _conv_down(out_channels, downsample_padding)
        elif self.downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([_resnet(out_channels, out_channels, *args, down=True)])
        elif self.downsample_type is None:
            self.downsamplers = None
        else:
            raise ValueError(f"downsample_type {downsample_type!r} is not one of conv, resnet")

    def _layers(self, hidden_states: torch.Tensor, temb: torch.Tensor | None, kwargs: dict):
        states = []
        attentions = self.attentions if self.with_attention else [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
            if attn is not None:
                hidden_states = attn(hidden_states, **kwargs)
            states.append(hidden_states)
        return hidden_states, states

    def _downsample(self, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        for down in self.downsamplers:
            hidden_states = down(hidden_states, temb) if self.downsample_type == "resnet" else down(hidden_states)
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        hidden_states, states = self._layers(hidden_states, temb, dict(cross_attention_kwargs or {}))
        if self.downsamplers is not None:
            hidden_states = self._downsample(hidden_states, temb)
            states.append(hidden_states)
        return hidden_states, tuple(states)


class AttnDownBlock2D(DownBlock2D):
    """ResNet + pixel self-attention pairs, then a downsampler (``downsample_type`` conv or resnet)."""

    with_attention = True

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, attention_head_dim: int | None = 1, output_scale_factor: float = 1.0,
                 downsample_padding: int = 1, downsample_type: str | None = "conv"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                         add_downsample=downsample_type is not None, downsample_padding=downsample_padding,
                         attention_head_dim=attention_head_dim, downsample_type=downsample_type)


class ResnetDownsampleBlock2D(DownBlock2D):
    """:class:`DownBlock2D` whose downsampler is a down ResNet (the consistency decoder's UNet)."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True):
        super().__init__(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                         add_downsample=add_downsample, downsample_type="resnet")


class DownEncoderBlock2D(DownBlock2D):
    """VAE encoder block: ResNets without time embedding, then an optional downsampler; returns the tensor only."""

    checkpointable = False

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, downsample_padding: int = 1, attention_head_dim: int | None = None):
        super().__init__(in_channels=in_channels, out_channels=out_channels, temb_channels=None, dropout=dropout,
                         num_layers=num_layers, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, attention_head_dim=attention_head_dim)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(hidden_states, None)[0]


class AttnDownEncoderBlock2D(DownEncoderBlock2D):
    """VAE encoder block with pixel self-attention after each ResNet."""

    with_attention = True

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, attention_head_dim: int | None = 1,
                 output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__(in_channels=in_channels, out_channels=out_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, attention_head_dim=attention_head_dim)


class CrossAttnDownBlock2D(DownBlock2D):
    """ResNet + spatial transformer (self/cross attention) pairs, then an optional conv downsampler."""

    has_cross_attention = True

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | list[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, downsample_padding: int = 1, add_downsample: bool = True,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False,
                 attention_type: str = "default"):
        _check_attention_type(attention_type, dual_cross_attention)
        layers = _per_layer(transformer_layers_per_block, num_layers)
        super().__init__(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                         add_downsample=add_downsample, downsample_padding=downsample_padding,
                         make_attention=lambda i: _transformer(
                             out_channels, num_attention_heads, layers[i], cross_attention_dim, resnet_groups,
                             use_linear_projection, only_cross_attention, upcast_attention))
        self.num_attention_heads = num_attention_heads

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                additional_residuals: torch.Tensor | None = None):
        states = []
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
            if i == len(self.resnets) - 1 and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            states.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self._downsample(hidden_states, temb)
            states.append(hidden_states)
        return hidden_states, tuple(states)


class SkipDownBlock2D(nn.Module):
    """NCSN++ down block: ResNets, then an FIR down ResNet plus the FIR-downsampled input image (``skip_conv``)."""

    has_cross_attention = False
    with_attention = False

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", output_scale_factor: float = math.sqrt(2.0), add_downsample: bool = True,
                 downsample_padding: int = 1, attention_head_dim: int | None = None):
        super().__init__()
        tail = (dropout, resnet_time_scale_shift, resnet_act_fn, output_scale_factor)

        def resnet(cin: int, **extra: Any) -> ResnetBlock2D:
            return _resnet(cin, out_channels, temb_channels, resnet_eps, min(cin // 4, 32), *tail,
                           groups_out=min(out_channels // 4, 32), **extra)

        def attention(i: int) -> Attention:
            return _pixel_attention(out_channels, attention_head_dim, resnet_eps, 32, output_scale_factor)

        _set_layers(self, *_interleaved(num_layers, lambda i: resnet(in_channels if i == 0 else out_channels),
                                        attention if self.with_attention else None))
        if add_downsample:
            self.resnet_down = resnet(out_channels, use_in_shortcut=True, down=True, kernel="fir")
            self.downsamplers = nn.ModuleList([FirDownsample2D(out_channels, out_channels=out_channels)])
            self.skip_conv = Conv2d(3, out_channels, kernel_size=(1, 1), stride=(1, 1))
        else:
            self.resnet_down = self.downsamplers = self.skip_conv = None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                skip_sample: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        states = []
        attentions = self.attentions if self.with_attention else [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = resnet(hidden_states, temb)
            if attn is not None:
                hidden_states = attn(hidden_states)
            states.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.resnet_down(hidden_states, temb)
            for down in self.downsamplers:
                skip_sample = down(skip_sample)
            hidden_states = self.skip_conv(skip_sample) + hidden_states
            states.append(hidden_states)
        return hidden_states, tuple(states), skip_sample


class AttnSkipDownBlock2D(SkipDownBlock2D):
    """:class:`SkipDownBlock2D` with pixel self-attention (32 groups) after each ResNet."""

    with_attention = True

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", attention_head_dim: int | None = 1,
                 output_scale_factor: float = math.sqrt(2.0), add_downsample: bool = True):
        super().__init__(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         attention_head_dim=attention_head_dim)


# -- mid blocks -----------------------------------------------------------------------------------

class UNetMidBlock2D(nn.Module):
    """ResNet, then ``num_layers`` x (pixel self-attention, ResNet). ``temb_channels=None`` for the VAE."""

    def __init__(self, *, in_channels: int, temb_channels: int | None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attn_groups: int | None = None, add_attention: bool = True, attention_head_dim: int | None = 1, output_scale_factor: float = 1.0):
        super().__init__()
        self.gradient_checkpointing = False
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        if attn_groups is None:
            attn_groups = groups if resnet_time_scale_shift == "default" else None
        args = (temb_channels, resnet_eps, groups, dropout, resnet_time_scale_shift, resnet_act_fn,
                output_scale_factor)
        self.add_attention = add_attention
        first = _resnet(in_channels, in_channels, *args)
        attentions, resnets = _interleaved(
            num_layers,
            lambda i: _pixel_attention(in_channels, attention_head_dim, resnet_eps, attn_groups,
                                       output_scale_factor) if add_attention else None,
            lambda i: _resnet(in_channels, in_channels, *args))
        _set_layers(self, nn.ModuleList([first, *resnets]), attentions)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = attn(hidden_states, temb=temb)
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
        return hidden_states


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResNet, then ``num_layers`` x (spatial transformer, ResNet)."""

    has_cross_attention = True

    def __init__(self, *, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 dropout: float = 0.0, num_layers: int = 1, transformer_layers_per_block: int | list[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_groups_out: int | None = None, num_attention_heads: int = 1, output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        super().__init__()
        self.gradient_checkpointing = False
        _check_attention_type(attention_type, dual_cross_attention)
        out_channels = out_channels or in_channels
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        groups_out = resnet_groups_out or groups
        self.num_attention_heads = num_attention_heads
        common = (temb_channels, resnet_eps)
        tail = (dropout, resnet_time_scale_shift, resnet_act_fn, output_scale_factor)
        first = _resnet(in_channels, out_channels, *common, groups, *tail, groups_out=groups_out)
        layers = _per_layer(transformer_layers_per_block, num_layers)
        attentions, resnets = _interleaved(
            num_layers,
            lambda i: _transformer(out_channels, num_attention_heads, layers[i], cross_attention_dim, groups_out,
                                   use_linear_projection, False, upcast_attention),
            lambda i: _resnet(out_channels, out_channels, *common, groups_out, *tail))
        _set_layers(self, nn.ModuleList([first, *resnets]), attentions)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
        return hidden_states


# -- up blocks ------------------------------------------------------------------------------------

def _skip_in_channels(i: int, num_layers: int, in_channels: int, prev_output_channel: int,
                      out_channels: int) -> tuple[int, int]:
    """(resnet input channels, skip channels) of up-block layer ``i``."""
    skip = in_channels if i == num_layers - 1 else out_channels
    return (prev_output_channel if i == 0 else out_channels), skip


class UpBlock2D(nn.Module):
    """ResNets fed with the concatenated down-path skips, then an optional upsampler (conv or up ResNet).

    ``make_attention(i)`` (for the subclasses) builds the attention after ResNet ``i``."""

    has_cross_attention = False
    with_attention = False
    s1 = s2 = b1 = b2 = None  # FreeU factors (models/freeu.py), set by the UNet's enable_freeu

    def __init__(self, *, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, attention_head_dim: int | None = None,
                 upsample_type: str | None = "conv", make_attention: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.gradient_checkpointing = False
        args = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn,
                output_scale_factor)
        self.resolution_idx = resolution_idx
        if make_attention is None and self.with_attention:
            def make_attention(i: int) -> nn.Module:
                return _pixel_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups,
                                        output_scale_factor)

        def make_resnet(i: int) -> nn.Module:
            skip_in = _skip_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            return _resnet(sum(skip_in), out_channels, *args)

        _set_layers(self, *_interleaved(num_layers, make_resnet, make_attention))
        self.upsample_type = upsample_type if add_upsample else None
        if self.upsample_type == "conv":
            self.upsamplers = _conv_up(out_channels)
        elif self.upsample_type == "resnet":
            self.upsamplers = nn.ModuleList([_resnet(out_channels, out_channels, *args, up=True)])
        elif self.upsample_type is None:
            self.upsamplers = None
        else:
            raise ValueError(f"upsample_type {upsample_type!r} is not one of conv, resnet")

    def _with_skip(self, hidden_states: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``cat([hidden_states, skip])`` on the channels, after FreeU when it is on (``enable_freeu``)."""
        return torch.cat(apply_freeu(self, hidden_states, skip), dim=1)

    def _upsample(self, hidden_states: torch.Tensor, temb: torch.Tensor | None,
                  upsample_size: Any) -> torch.Tensor:
        for up in self.upsamplers:
            hidden_states = up(hidden_states, temb) if self.upsample_type == "resnet" else up(hidden_states,
                                                                                              upsample_size)
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, upsample_size: Any = None,
                cross_attention_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        res = list(res_hidden_states_tuple)
        attentions = self.attentions if self.with_attention else [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = maybe_checkpoint(self, resnet, self._with_skip(hidden_states, res.pop()), temb)
            if attn is not None:
                hidden_states = attn(hidden_states, **dict(cross_attention_kwargs or {}))
        if self.upsamplers is not None:
            hidden_states = self._upsample(hidden_states, temb, upsample_size)
        return hidden_states


class AttnUpBlock2D(UpBlock2D):
    """:class:`UpBlock2D` with pixel self-attention after each ResNet (``upsample_type`` conv or resnet)."""

    with_attention = True

    def __init__(self, *, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, attention_head_dim: int | None = 1,
                 output_scale_factor: float = 1.0, upsample_type: str | None = "conv"):
        super().__init__(in_channels=in_channels, prev_output_channel=prev_output_channel, out_channels=out_channels,
                         temb_channels=temb_channels, resolution_idx=resolution_idx, dropout=dropout,
                         num_layers=num_layers, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_upsample=upsample_type is not None,
                         attention_head_dim=attention_head_dim, upsample_type=upsample_type)


class ResnetUpsampleBlock2D(UpBlock2D):
    """:class:`UpBlock2D` whose upsampler is an up ResNet (the consistency decoder's UNet)."""

    def __init__(self, *, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0, add_upsample: bool = True):
        super().__init__(in_channels=in_channels, prev_output_channel=prev_output_channel, out_channels=out_channels,
                         temb_channels=temb_channels, resolution_idx=resolution_idx, dropout=dropout,
                         num_layers=num_layers, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, upsample_type="resnet")


class CrossAttnUpBlock2D(UpBlock2D):
    """:class:`UpBlock2D` with a spatial transformer after each ResNet."""

    has_cross_attention = True

    def __init__(self, *, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | list[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        _check_attention_type(attention_type, dual_cross_attention)
        layers = _per_layer(transformer_layers_per_block, num_layers)
        super().__init__(in_channels=in_channels, prev_output_channel=prev_output_channel, out_channels=out_channels,
                         temb_channels=temb_channels, resolution_idx=resolution_idx, dropout=dropout,
                         num_layers=num_layers, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample,
                         make_attention=lambda i: _transformer(
                             out_channels, num_attention_heads, layers[i], cross_attention_dim, resnet_groups,
                             use_linear_projection, only_cross_attention, upcast_attention))
        self.num_attention_heads = num_attention_heads

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, upsample_size: Any = None,
                attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        res = list(res_hidden_states_tuple)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = maybe_checkpoint(self, resnet, self._with_skip(hidden_states, res.pop()), temb)
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        if self.upsamplers is not None:
            hidden_states = self._upsample(hidden_states, temb, upsample_size)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """VAE decoder block: ResNets (``temb`` optional), then an optional conv upsampler."""

    with_attention = False

    def __init__(self, *, in_channels: int, out_channels: int, resolution_idx: int | None = None,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True,
                 temb_channels: int | None = None, attention_head_dim: int | None = None):
        super().__init__()
        args = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn,
                output_scale_factor)
        self.resolution_idx = resolution_idx

        def attention(i: int) -> Attention:
            return _pixel_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups, output_scale_factor)

        _set_layers(self, *_interleaved(
            num_layers, lambda i: _resnet(in_channels if i == 0 else out_channels, out_channels, *args),
            attention if self.with_attention else None))
        self.upsamplers = _conv_up(out_channels) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        attentions = self.attentions if self.with_attention else [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = resnet(hidden_states, temb)
            if attn is not None:
                hidden_states = attn(hidden_states, temb=temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states)
        return hidden_states


class AttnUpDecoderBlock2D(UpDecoderBlock2D):
    """VAE decoder block with pixel self-attention after each ResNet."""

    with_attention = True

    def __init__(self, *, in_channels: int, out_channels: int, resolution_idx: int | None = None,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 attention_head_dim: int | None = 1, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, temb_channels: int | None = None):
        super().__init__(in_channels=in_channels, out_channels=out_channels, resolution_idx=resolution_idx,
                         dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                         add_upsample=add_upsample, temb_channels=temb_channels,
                         attention_head_dim=attention_head_dim)


class SkipUpBlock2D(nn.Module):
    """NCSN++ up block: ResNets on concatenated skips; accumulates an RGB ``skip_sample`` (FIR-upsampled)."""

    has_cross_attention = False
    with_attention = False

    def __init__(self, *, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 output_scale_factor: float = math.sqrt(2.0),
                 add_upsample: bool = True, upsample_padding: int = 1, attention_head_dim: int | None = None):
        super().__init__()
        self.resolution_idx = resolution_idx
        tail = (dropout, resnet_time_scale_shift, resnet_act_fn, output_scale_factor)
        groups_out = min(out_channels // 4, 32)
        resnets = []
        for i in range(num_layers):
            cin, skip = _skip_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            # the reference's attention variant computes groups as min(cin + skip // 4, 32)
            groups = min(cin + skip // 4, 32) if self.with_attention else min((cin + skip) // 4, 32)
            resnets.append(_resnet(cin + skip, out_channels, temb_channels, resnet_eps, groups, *tail,
                                   groups_out=groups_out))
        attentions = nn.ModuleList(
            [_pixel_attention(out_channels, attention_head_dim, resnet_eps, 32, output_scale_factor)]
        ) if self.with_attention else None
        _set_layers(self, nn.ModuleList(resnets), attentions)
        self.upsampler = FirUpsample2D(in_channels, out_channels=out_channels)
        if add_upsample:
            self.resnet_up = _resnet(out_channels, out_channels, temb_channels, resnet_eps, groups_out, *tail,
                                     groups_out=groups_out, use_in_shortcut=True, up=True, kernel="fir")
            self.skip_conv = Conv2d(out_channels, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            self.skip_norm = GroupNorm(num_groups=groups_out, num_channels=out_channels, eps=resnet_eps,
                                          affine=True)
            self.act = nn.SiLU()
        else:
            self.resnet_up = self.skip_conv = self.skip_norm = self.act = None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, skip_sample: torch.Tensor | None = None,
                *args: Any, **kwargs: Any):
        res = list(res_hidden_states_tuple)
        for resnet in self.resnets:
            hidden_states = resnet(torch.cat([hidden_states, res.pop()], dim=1), temb)
        if self.with_attention:
            hidden_states = self.attentions[0](hidden_states)
        skip_sample = self.upsampler(skip_sample) if skip_sample is not None else 0
        if self.resnet_up is not None:
            skip_sample = skip_sample + self.skip_conv(self.act(self.skip_norm(hidden_states)))
            hidden_states = self.resnet_up(hidden_states, temb)
        return hidden_states, skip_sample


class AttnSkipUpBlock2D(SkipUpBlock2D):
    """:class:`SkipUpBlock2D` with one pixel self-attention (32 groups) after the ResNets."""

    with_attention = True

    def __init__(self, *, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 attention_head_dim: int | None = 1,
                 output_scale_factor: float = math.sqrt(2.0), add_upsample: bool = True):
        super().__init__(in_channels=in_channels, prev_output_channel=prev_output_channel, out_channels=out_channels,
                         temb_channels=temb_channels, resolution_idx=resolution_idx, dropout=dropout,
                         num_layers=num_layers, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, output_scale_factor=output_scale_factor,
                         add_upsample=add_upsample, attention_head_dim=attention_head_dim)


# -- factories ------------------------------------------------------------------------------------

def _pick(cls: type, **names: str) -> Callable[[dict], nn.Module]:
    """A builder calling ``cls`` with the listed factory arguments (constructor name -> factory name)."""
    def build(args: dict) -> nn.Module:
        return cls(**{ctor: args[factory] for ctor, factory in names.items()})
    return build


_RESNET = dict(num_layers="num_layers", in_channels="in_channels", out_channels="out_channels",
               dropout="dropout", resnet_eps="resnet_eps", resnet_act_fn="resnet_act_fn",
               resnet_time_scale_shift="resnet_time_scale_shift")
_GROUPS = dict(resnet_groups="resnet_groups")
_CROSS = dict(transformer_layers_per_block="transformer_layers_per_block",
              num_attention_heads="num_attention_heads", cross_attention_dim="cross_attention_dim",
              dual_cross_attention="dual_cross_attention", use_linear_projection="use_linear_projection",
              only_cross_attention="only_cross_attention", upcast_attention="upcast_attention",
              attention_type="attention_type")
_TEMB = dict(temb_channels="temb_channels")
_HEAD = dict(attention_head_dim="attention_head_dim")

DOWN_BLOCKS: dict[str, Callable[[dict], nn.Module]] = {
    "DownBlock2D": _pick(DownBlock2D, **_RESNET, **_GROUPS, **_TEMB, add_downsample="add_downsample",
                         downsample_padding="downsample_padding"),
    "AttnDownBlock2D": _pick(AttnDownBlock2D, **_RESNET, **_GROUPS, **_TEMB, **_HEAD,
                             downsample_padding="downsample_padding", downsample_type="attn_downsample_type"),
    "CrossAttnDownBlock2D": _pick(CrossAttnDownBlock2D, **_RESNET, **_GROUPS, **_TEMB, **_CROSS,
                                  add_downsample="add_downsample", downsample_padding="downsample_padding"),
    "ResnetDownsampleBlock2D": _pick(ResnetDownsampleBlock2D, **_RESNET, **_GROUPS, **_TEMB,
                                     add_downsample="add_downsample"),
    "SkipDownBlock2D": _pick(SkipDownBlock2D, **_RESNET, **_TEMB, add_downsample="add_downsample",
                             downsample_padding="downsample_padding"),
    "AttnSkipDownBlock2D": _pick(AttnSkipDownBlock2D, **_RESNET, **_TEMB, **_HEAD, add_downsample="add_downsample"),
    "DownEncoderBlock2D": _pick(DownEncoderBlock2D, **_RESNET, **_GROUPS, add_downsample="add_downsample",
                                downsample_padding="downsample_padding"),
    "AttnDownEncoderBlock2D": _pick(AttnDownEncoderBlock2D, **_RESNET, **_GROUPS, **_HEAD,
                                    add_downsample="add_downsample", downsample_padding="downsample_padding"),
}

UP_BLOCKS: dict[str, Callable[[dict], nn.Module]] = {
    "UpBlock2D": _pick(UpBlock2D, **_RESNET, **_GROUPS, **_TEMB, prev_output_channel="prev_output_channel",
                       resolution_idx="resolution_idx", add_upsample="add_upsample"),
    "AttnUpBlock2D": _pick(AttnUpBlock2D, **_RESNET, **_GROUPS, **_TEMB, **_HEAD,
                           prev_output_channel="prev_output_channel", resolution_idx="resolution_idx",
                           upsample_type="attn_upsample_type"),
    "CrossAttnUpBlock2D": _pick(CrossAttnUpBlock2D, **_RESNET, **_GROUPS, **_TEMB, **_CROSS,
                                prev_output_channel="prev_output_channel", resolution_idx="resolution_idx",
                                add_upsample="add_upsample"),
    "ResnetUpsampleBlock2D": _pick(ResnetUpsampleBlock2D, **_RESNET, **_GROUPS, **_TEMB,
                                   prev_output_channel="prev_output_channel", resolution_idx="resolution_idx",
                                   add_upsample="add_upsample"),
    "SkipUpBlock2D": _pick(SkipUpBlock2D, **_RESNET, **_TEMB, prev_output_channel="prev_output_channel",
                           resolution_idx="resolution_idx", add_upsample="add_upsample"),
    "AttnSkipUpBlock2D": _pick(AttnSkipUpBlock2D, **_RESNET, **_TEMB, **_HEAD,
                               prev_output_channel="prev_output_channel", resolution_idx="resolution_idx",
                               add_upsample="add_upsample"),
    "UpDecoderBlock2D": _pick(UpDecoderBlock2D, **_RESNET, **_GROUPS, **_TEMB, resolution_idx="resolution_idx",
                              add_upsample="add_upsample"),
    "AttnUpDecoderBlock2D": _pick(AttnUpDecoderBlock2D, **_RESNET, **_GROUPS, **_TEMB, **_HEAD,
                                  resolution_idx="resolution_idx", add_upsample="add_upsample"),
}


def _block_name(name: str, table: dict) -> str:
    name = name[7:] if name.startswith("UNetRes") else name
    if name not in table:
        raise ValueError(f"block type {name!r} is not one of {sorted(table)}")
    return name


def get_down_block(down_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int | None, add_downsample: bool, resnet_eps: float, resnet_act_fn: str,
                   transformer_layers_per_block: int | list[int] = 1, num_attention_heads: int | None = None,
                   resnet_groups: int | None = None, cross_attention_dim: int | None = None,
                   downsample_padding: int | None = None, dual_cross_attention: bool = False,
                   use_linear_projection: bool = False, only_cross_attention: bool = False,
                   upcast_attention: bool = False, resnet_time_scale_shift: str = "default",
                   attention_type: str = "default", attention_head_dim: int | None = None,
                   downsample_type: str | None = None, dropout: float = 0.0) -> nn.Module:
    """Build a down block by its reference type name (``UNetRes`` prefixes are accepted)."""
    args = dict(locals())
    name = _block_name(down_block_type, DOWN_BLOCKS)
    if attention_head_dim is None:
        args["attention_head_dim"] = num_attention_heads
    args["attn_downsample_type"] = (downsample_type or "conv") if add_downsample else None
    if name == "CrossAttnDownBlock2D" and cross_attention_dim is None:
        raise ValueError("cross_attention_dim must be set for CrossAttnDownBlock2D")
    return DOWN_BLOCKS[name](args)


def get_up_block(up_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                 prev_output_channel: int, temb_channels: int | None, add_upsample: bool, resnet_eps: float,
                 resnet_act_fn: str, resolution_idx: int | None = None,
                 transformer_layers_per_block: int | list[int] = 1, num_attention_heads: int | None = None,
                 resnet_groups: int | None = None, cross_attention_dim: int | None = None,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False,
                 resnet_time_scale_shift: str = "default", attention_type: str = "default",
                 attention_head_dim: int | None = None, upsample_type: str | None = None,
                 dropout: float = 0.0) -> nn.Module:
    """Build an up block by its reference type name (``UNetRes`` prefixes are accepted)."""
    args = dict(locals())
    name = _block_name(up_block_type, UP_BLOCKS)
    if attention_head_dim is None:
        args["attention_head_dim"] = num_attention_heads
    args["attn_upsample_type"] = (upsample_type or "conv") if add_upsample else None
    if name == "CrossAttnUpBlock2D" and cross_attention_dim is None:
        raise ValueError("cross_attention_dim must be set for CrossAttnUpBlock2D")
    return UP_BLOCKS[name](args)


def get_mid_block(mid_block_type: str | None, *, temb_channels: int, in_channels: int, resnet_eps: float,
                  resnet_act_fn: str, resnet_groups: int, output_scale_factor: float = 1.0,
                  transformer_layers_per_block: int | list[int] = 1, num_attention_heads: int | None = None,
                  cross_attention_dim: int | None = None, dual_cross_attention: bool = False,
                  use_linear_projection: bool = False, upcast_attention: bool = False,
                  resnet_time_scale_shift: str = "default", attention_type: str = "default",
                  attention_head_dim: int | None = 1, dropout: float = 0.0) -> nn.Module | None:
    """Build the mid block of a conditional UNet: ``UNetMidBlock2DCrossAttn``, ``UNetMidBlock2D`` or ``None``."""
    if mid_block_type is None:
        return None
    common = dict(in_channels=in_channels, temb_channels=temb_channels, dropout=dropout, resnet_eps=resnet_eps,
                  resnet_act_fn=resnet_act_fn, output_scale_factor=output_scale_factor, resnet_groups=resnet_groups,
                  resnet_time_scale_shift=resnet_time_scale_shift)
    if mid_block_type == "UNetMidBlock2DCrossAttn":
        return UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=transformer_layers_per_block, cross_attention_dim=cross_attention_dim,
            num_attention_heads=num_attention_heads, dual_cross_attention=dual_cross_attention,
            use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
            attention_type=attention_type, **common)
    if mid_block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(num_layers=0, add_attention=False, **common)
    raise ValueError(f"mid_block_type {mid_block_type!r} is not one of UNetMidBlock2DCrossAttn, UNetMidBlock2D")
