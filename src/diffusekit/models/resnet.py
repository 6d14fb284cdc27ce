"""Residual blocks and resamplers shared by the UNets and autoencoders.

- :class:`ResnetBlock2D` (keys ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``):
  ``ResnetBlock2D(in_channels=, out_channels=, temb_channels=512 | None, groups=32, groups_out=None,
  eps=1e-6, dropout=0.0, non_linearity="swish", time_embedding_norm="default" | "scale_shift",
  output_scale_factor=1.0, skip_time_act=False, up=False, down=False, kernel=None | "fir" | "sde_vp",
  use_in_shortcut=None, conv_shortcut_bias=True, conv_2d_out_channels=None)``; call ``block(x, temb)``
  (``temb=None`` for the VAE, built with ``temb_channels=None``).
- :class:`Upsample2D` (nearest x2 then optional 3x3 ``conv``; ``use_conv_transpose`` gives a 4x4
  transposed conv) and :class:`Downsample2D` (strided 3x3 ``conv`` or 2x2 average pooling;
  ``padding=0`` pads right/bottom by one first, as the VAE encoder does).
- :class:`FirUpsample2D` / :class:`FirDownsample2D` and :func:`upsample_2d` / :func:`downsample_2d`:
  FIR-filtered resampling (kernel ``(1, 3, 3, 1)``) used by NCSN++; optional conv ``Conv2d_0``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, ConvTranspose2d, GroupNorm, Linear
from .embeddings import get_activation

_FIR_KERNEL = (1, 3, 3, 1)


# -- FIR resampling ------------------------------------------------------------------------------

def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Zero-insert upsample by ``up``, pad both spatial dims by ``pad`` (before, after), filter, keep every ``down``-th."""
    batch, channels, height, width = x.shape
    if up > 1:
        grid = x.new_zeros(batch, channels, height, up, width, up)
        grid[:, :, :, 0, :, 0] = x
        x = grid.reshape(batch, channels, height * up, width * up)
    before, after = pad
    x = F.pad(x, [max(before, 0), max(after, 0)] * 2)
    if before < 0 or after < 0:
        x = x[:, :, max(-before, 0): x.shape[2] - max(-after, 0), max(-before, 0): x.shape[3] - max(-after, 0)]
    weight = torch.flip(kernel, [0, 1])[None, None].to(x)
    out = F.conv2d(x.reshape(batch * channels, 1, *x.shape[2:]), weight)
    out = out.reshape(batch, channels, *out.shape[2:])
    return out[:, :, ::down, ::down]


def _fir_kernel(kernel: Sequence[float] | None, factor: int, gain: float) -> torch.Tensor:
    k = torch.tensor(kernel if kernel is not None else [1] * factor, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    return k / k.sum() * gain


def upsample_2d(x: torch.Tensor, kernel: Sequence[float] | None = None, factor: int = 2,
                gain: float = 1) -> torch.Tensor:
    """Upsample by ``factor`` with an FIR filter (default nearest neighbour)."""
    k = _fir_kernel(kernel, factor, gain * factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: Sequence[float] | None = None, factor: int = 2,
                  gain: float = 1) -> torch.Tensor:
    """Downsample by ``factor`` with an FIR filter (default average pooling)."""
    k = _fir_kernel(kernel, factor, gain)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


class FirUpsample2D(nn.Module):
    """FIR upsampling x2, optionally fused with a 3x3 transposed convolution ``Conv2d_0``."""

    def __init__(self, channels: int | None = None, out_channels: int | None = None, use_conv: bool = False,
                 fir_kernel: Sequence[int] = _FIR_KERNEL):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.Conv2d_0 = Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.use_conv = use_conv
        self.fir_kernel = fir_kernel
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return upsample_2d(x, self.fir_kernel, factor=2)
        factor = 2
        weight = self.Conv2d_0.weight
        k = _fir_kernel(self.fir_kernel, factor, factor**2)
        conv_h, conv_w = weight.shape[2:]
        # transposed conv with the flipped, in/out-swapped kernel, then the FIR filter
        weight = torch.flip(weight, dims=[2, 3]).transpose(0, 1)
        x = F.conv_transpose2d(x, weight, stride=factor)
        p = (k.shape[0] - factor) - (conv_w - 1)
        x = upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
        return x + self.Conv2d_0.bias.reshape(1, -1, 1, 1)


class FirDownsample2D(nn.Module):
    """FIR downsampling x2, optionally fused with a strided 3x3 convolution ``Conv2d_0``."""

    def __init__(self, channels: int | None = None, out_channels: int | None = None, use_conv: bool = False,
                 fir_kernel: Sequence[int] = _FIR_KERNEL):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.Conv2d_0 = Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.fir_kernel = fir_kernel
        self.use_conv = use_conv
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return downsample_2d(x, self.fir_kernel, factor=2)
        factor = 2
        k = _fir_kernel(self.fir_kernel, factor, 1)
        p = (k.shape[0] - factor) + (self.Conv2d_0.weight.shape[3] - 1)
        x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
        x = F.conv2d(x, self.Conv2d_0.weight, stride=factor)
        return x + self.Conv2d_0.bias.reshape(1, -1, 1, 1)


# -- plain resampling ----------------------------------------------------------------------------

class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to ``output_size``) upsampling, then an optional conv named ``conv`` or ``Conv2d_0``."""

    def __init__(self, channels: int, use_conv: bool = False, use_conv_transpose: bool = False,
                 out_channels: int | None = None, name: str = "conv", kernel_size: int | None = None,
                 padding: int = 1, bias: bool = True, interpolate: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_conv_transpose = use_conv_transpose
        self.interpolate = interpolate
        conv = None
        if use_conv_transpose:
            conv = ConvTranspose2d(channels, self.out_channels, kernel_size=kernel_size or 4, stride=2,
                                      padding=padding, bias=bias)
        elif use_conv:
            conv = Conv2d(channels, self.out_channels, kernel_size=kernel_size or 3, padding=padding, bias=bias)
        self.conv_name = "conv" if name == "conv" else "Conv2d_0"
        setattr(self, self.conv_name, conv)

    def forward(self, hidden_states: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {hidden_states.shape[1]}")
        conv = getattr(self, self.conv_name)
        if self.use_conv_transpose:
            return conv(hidden_states)
        if self.interpolate:
            if output_size is None:
                hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            else:
                hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return conv(hidden_states) if self.use_conv else hidden_states


class Downsample2D(nn.Module):
    """x2 downsampling: strided conv ``conv`` (``use_conv``) or 2x2 average pooling.

    With ``padding=0`` the input is first padded by one on the right and bottom.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1,
                 name: str = "conv", kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            conv = Conv2d(channels, self.out_channels, kernel_size=kernel_size, stride=2, padding=padding,
                             bias=bias)
        else:
            if self.channels != self.out_channels:
                raise ValueError("out_channels must equal channels when use_conv=False")
            conv = nn.AvgPool2d(kernel_size=2, stride=2)
        if name == "conv":  # the reference registers the same conv under both names
            self.Conv2d_0 = conv
        self.conv = conv

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {hidden_states.shape[1]}")
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


# -- residual block ------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv residual block conditioned on a time embedding (see the module docstring)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        skip_time_act: bool = False,
        time_embedding_norm: str = "default",
        kernel: str | None = None,
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        up: bool = False,
        down: bool = False,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: int | None = None,
    ):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm {time_embedding_norm!r} is not supported (default, scale_shift)")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.up, self.down, self.kernel = up, down, kernel

        self.norm1 = GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            scale = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = Linear(temb_channels, scale * out_channels)
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.conv2 = Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.upsample = Upsample2D(in_channels) if up and kernel not in ("fir", "sde_vp") else None
        self.downsample = (
            Downsample2D(in_channels, use_conv=False, padding=1, name="op")
            if down and not up and kernel not in ("fir", "sde_vp") else None
        )
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != conv_2d_out_channels
        self.use_in_shortcut = use_in_shortcut
        self.conv_shortcut = (
            Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, stride=1, padding=0, bias=conv_shortcut_bias)
            if use_in_shortcut else None
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            if self.kernel == "fir":
                return upsample_2d(x, kernel=_FIR_KERNEL)
            if self.kernel == "sde_vp":
                return F.interpolate(x, scale_factor=2.0, mode="nearest")
            return self.upsample(x)
        if self.down:
            if self.kernel == "fir":
                return downsample_2d(x, kernel=_FIR_KERNEL)
            if self.kernel == "sde_vp":
                return F.avg_pool2d(x, kernel_size=2, stride=2)
            return self.downsample(x)
        return x

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        hidden = self.nonlinearity(self.norm1(input_tensor))
        input_tensor = self._resample(input_tensor)
        hidden = self.conv1(self._resample(hidden))
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        elif self.time_emb_proj is None:
            temb = None
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("temb is required when time_embedding_norm is 'scale_shift'")
            scale, shift = temb.chunk(2, dim=1)
            hidden = self.norm2(hidden) * (1 + scale) + shift
        else:
            if temb is not None:
                hidden = hidden + temb
            hidden = self.norm2(hidden)
        hidden = self.conv2(self.dropout(self.nonlinearity(hidden)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor
