"""Blocks of :class:`~diffusekit.models.unet_1d.UNet1DModel`.

Two families share the file:

- Dance Diffusion (audio): :class:`ResConvBlock` + :class:`SelfAttention1d` stacks with fixed-kernel
  resampling (``DownBlock1D``, ``AttnDownBlock1D``, ``DownBlock1DNoSkip``, ``UNetMidBlock1D``,
  ``AttnUpBlock1D``, ``UpBlock1D``, ``UpBlock1DNoSkip``).
- Diffuser RL planners: :class:`ResidualTemporalBlock1D` stacks (``DownResnetBlock1D``,
  ``UpResnetBlock1D``, ``MidResTemporalBlock1D``, ``ValueFunctionMidBlock1D``) and the output heads
  ``OutConv1DBlock`` / ``ValueFunction``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv1d, ConvTranspose1d, GroupNorm, Linear
from .embeddings import get_activation

# Resampling kernels of the audio blocks (their values are also stored in checkpoints as ``kernel``).
_KERNELS = {
    "linear": [1 / 8, 3 / 8, 3 / 8, 1 / 8],
    "cubic": [-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875],
    "lanczos3": [
        0.003689131001010537, 0.015056144446134567, -0.03399861603975296, -0.066637322306633,
        0.13550527393817902, 0.44638532400131226, 0.44638532400131226, 0.13550527393817902,
        -0.066637322306633, -0.03399861603975296, 0.015056144446134567, 0.003689131001010537,
    ],
}


def _kernel(name: str) -> torch.Tensor:
    if name not in _KERNELS:
        raise ValueError(f"kernel {name!r} is not one of {sorted(_KERNELS)}")
    return torch.tensor(_KERNELS[name])


class KernelDownsample1D(nn.Module):
    """Halve the length with a fixed per-channel FIR kernel after reflect padding (buffer ``kernel``)."""

    def __init__(self, kernel: str = "linear", pad_mode: str = "reflect"):
        super().__init__()
        self.pad_mode = pad_mode
        self.register_buffer("kernel", _kernel(kernel))
        self.pad = len(_KERNELS[kernel]) // 2 - 1

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        channels = hidden_states.shape[1]
        hidden_states = F.pad(hidden_states, (self.pad, self.pad), self.pad_mode)
        weight = self.kernel.to(hidden_states)[None, None, :].expand(channels, 1, -1)
        return F.conv1d(hidden_states, weight, stride=2, groups=channels)


class KernelUpsample1D(nn.Module):
    """Double the length with a transposed fixed per-channel FIR kernel (buffer ``kernel``, twice the taps)."""

    def __init__(self, kernel: str = "linear", pad_mode: str = "reflect"):
        super().__init__()
        self.pad_mode = pad_mode
        self.register_buffer("kernel", _kernel(kernel) * 2)
        self.pad = len(_KERNELS[kernel]) // 2 - 1

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        channels = hidden_states.shape[1]
        edge = (self.pad + 1) // 2
        hidden_states = F.pad(hidden_states, (edge, edge), self.pad_mode)
        weight = self.kernel.to(hidden_states)[None, None, :].expand(channels, 1, -1)
        return F.conv_transpose1d(hidden_states, weight, stride=2, padding=self.pad * 2 + 1, groups=channels)


class SelfAttention1d(nn.Module):
    """Multi-head self-attention over the length axis with a residual; GroupNorm(1) in front."""

    def __init__(self, in_channels: int, n_head: int = 1, dropout_rate: float = 0.0):
        super().__init__()
        if n_head < 1 or in_channels % n_head:
            raise ValueError(f"in_channels={in_channels} must be a positive multiple of n_head={n_head}")
        self.channels = in_channels
        self.num_heads = n_head
        self.group_norm = GroupNorm(1, num_channels=in_channels)
        self.query = Linear(in_channels, in_channels)
        self.key = Linear(in_channels, in_channels)
        self.value = Linear(in_channels, in_channels)
        self.proj_attn = Linear(in_channels, in_channels)
        self.dropout = nn.Dropout(dropout_rate)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, length = hidden_states.shape
        x = self.group_norm(hidden_states).transpose(1, 2)
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scale = 1 / math.sqrt(math.sqrt(k.shape[-1]))
        probs = torch.softmax((q * scale) @ (k * scale).transpose(-1, -2), dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, channels)
        out = self.dropout(self.proj_attn(out).transpose(1, 2))
        return out + hidden_states


class ResConvBlock(nn.Module):
    """conv5 -> GroupNorm(1) -> GELU -> conv5 [-> GroupNorm(1) -> GELU] plus a (1x1-projected) residual."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.has_conv_skip = in_channels != out_channels
        if self.has_conv_skip:
            self.conv_skip = Conv1d(in_channels, out_channels, 1, bias=False)
        self.conv_1 = Conv1d(in_channels, mid_channels, 5, padding=2)
        self.group_norm_1 = GroupNorm(1, mid_channels)
        self.gelu_1 = nn.GELU()
        self.conv_2 = Conv1d(mid_channels, out_channels, 5, padding=2)
        if not is_last:
            self.group_norm_2 = GroupNorm(1, out_channels)
            self.gelu_2 = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv_skip(hidden_states) if self.has_conv_skip else hidden_states
        x = self.conv_2(self.gelu_1(self.group_norm_1(self.conv_1(hidden_states))))
        if not self.is_last:
            x = self.gelu_2(self.group_norm_2(x))
        return x + residual


def _res_stack(in_channels: int, mid_channels: int, out_channels: int, count: int,
               last_is_final: bool = False) -> nn.ModuleList:
    """``count`` ResConvBlocks: in -> mid, mid -> mid ..., mid -> out."""
    blocks = []
    for i in range(count):
        first, last = i == 0, i == count - 1
        blocks.append(ResConvBlock(in_channels if first else mid_channels, mid_channels,
                                   out_channels if last else mid_channels, is_last=last and last_is_final))
    return nn.ModuleList(blocks)


def _attn_stack(mid_channels: int, out_channels: int, count: int) -> nn.ModuleList:
    """Attentions matching :func:`_res_stack`: ``channels // 32`` heads each."""
    sizes = [mid_channels] * (count - 1) + [out_channels]
    return nn.ModuleList(SelfAttention1d(c, c // 32) for c in sizes)


class DownBlock1D(nn.Module):
    """Cubic downsample, then three ResConvBlocks."""

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.down = KernelDownsample1D("cubic")
        self.resnets = _res_stack(in_channels, mid_channels, out_channels, 3)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        hidden_states = self.down(hidden_states)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return hidden_states, (hidden_states,)


class AttnDownBlock1D(nn.Module):
    """Cubic downsample, then three ResConvBlock + SelfAttention1d pairs."""

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.down = KernelDownsample1D("cubic")
        resnets = _res_stack(in_channels, mid_channels, out_channels, 3)
        self.attentions = _attn_stack(mid_channels, out_channels, 3)  # registered first, as the reference
        self.resnets = resnets

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        hidden_states = self.down(hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states))
        return hidden_states, (hidden_states,)


class DownBlock1DNoSkip(nn.Module):
    """Concatenate the time features to the input channels, then three ResConvBlocks (no resampling)."""

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.resnets = _res_stack(in_channels, mid_channels, out_channels, 3)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        hidden_states = torch.cat([hidden_states, temb], dim=1)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return hidden_states, (hidden_states,)


class UNetMidBlock1D(nn.Module):
    """Cubic downsample, six ResConvBlock + SelfAttention1d pairs, cubic upsample."""

    def __init__(self, mid_channels: int, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.down = KernelDownsample1D("cubic")
        self.up = KernelUpsample1D(kernel="cubic")
        resnets = _res_stack(in_channels, mid_channels, out_channels, 6)
        self.attentions = _attn_stack(mid_channels, out_channels, 6)  # registered first, as the reference
        self.resnets = resnets

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.down(hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states))
        return self.up(hidden_states)


class AttnUpBlock1D(nn.Module):
    """Concatenate the skip, three ResConvBlock + SelfAttention1d pairs, cubic upsample."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        resnets = _res_stack(2 * in_channels, mid_channels, out_channels, 3)
        self.attentions = _attn_stack(mid_channels, out_channels, 3)  # registered first, as the reference
        self.resnets = resnets
        self.up = KernelUpsample1D(kernel="cubic")

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states))
        return self.up(hidden_states)


class UpBlock1D(nn.Module):
    """Concatenate the skip, three ResConvBlocks, cubic upsample."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or in_channels
        self.resnets = _res_stack(2 * in_channels, mid_channels, out_channels, 3)
        self.up = KernelUpsample1D(kernel="cubic")

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return self.up(hidden_states)


class UpBlock1DNoSkip(nn.Module):
    """Concatenate the skip, three ResConvBlocks; the last one ends on its convolution (the model output)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or in_channels
        self.resnets = _res_stack(2 * in_channels, mid_channels, out_channels, 3, last_is_final=True)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return hidden_states


# -- RL planner blocks (Diffuser) ---------------------------------------------------------------


def _group_norm_1d(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm applied through a dummy height axis, as the reference does."""
    return norm(x[:, :, None, :])[:, :, 0, :]


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> activation (mish by default)."""

    def __init__(self, inp_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8,
                 activation: str = "mish"):
        super().__init__()
        self.conv1d = Conv1d(inp_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.group_norm = GroupNorm(n_groups, out_channels)
        self.mish = get_activation(activation)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mish(_group_norm_1d(self.group_norm, self.conv1d(inputs)))


class ResidualTemporalBlock1D(nn.Module):
    """Two Conv1dBlocks with the (activated, projected) time embedding added in between, plus a residual."""

    def __init__(self, inp_channels: int, out_channels: int, embed_dim: int, kernel_size: int = 5,
                 activation: str = "mish"):
        super().__init__()
        self.conv_in = Conv1dBlock(inp_channels, out_channels, kernel_size)
        self.conv_out = Conv1dBlock(out_channels, out_channels, kernel_size)
        self.time_emb_act = get_activation(activation)
        self.time_emb = Linear(embed_dim, out_channels)
        self.residual_conv = (
            Conv1d(inp_channels, out_channels, 1) if inp_channels != out_channels else nn.Identity()
        )

    def forward(self, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self.time_emb(self.time_emb_act(t))
        out = self.conv_out(self.conv_in(inputs) + t[:, :, None])
        return out + self.residual_conv(inputs)


class ConvDownsample1D(nn.Module):
    """Stride-2 convolution (``conv``), kernel 3."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = Conv1d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.conv(inputs)


class ConvUpsample1D(nn.Module):
    """Transposed convolution (``use_conv_transpose``) or nearest x2 followed by a conv3 (``conv``)."""

    def __init__(self, channels: int, use_conv_transpose: bool = False):
        super().__init__()
        self.use_conv_transpose = use_conv_transpose
        if use_conv_transpose:
            self.conv = ConvTranspose1d(channels, channels, 4, 2, 1)
        else:
            self.conv = Conv1d(channels, channels, 3, padding=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.use_conv_transpose:
            return self.conv(inputs)
        return self.conv(F.interpolate(inputs, scale_factor=2.0, mode="nearest"))


def _temporal_stack(in_channels: int, out_channels: int, embed_dim: int, num_layers: int) -> nn.ModuleList:
    """One in -> out block plus ``num_layers`` out -> out blocks."""
    blocks = [ResidualTemporalBlock1D(in_channels, out_channels, embed_dim=embed_dim)]
    blocks += [ResidualTemporalBlock1D(out_channels, out_channels, embed_dim=embed_dim) for _ in range(num_layers)]
    return nn.ModuleList(blocks)


class DownResnetBlock1D(nn.Module):
    """Temporal residual blocks, optional activation, optional stride-2 conv downsample."""

    def __init__(self, in_channels: int, out_channels: int | None = None, num_layers: int = 1,
                 temb_channels: int = 32, non_linearity: str | None = None, add_downsample: bool = True):
        super().__init__()
        out_channels = out_channels or in_channels
        self.resnets = _temporal_stack(in_channels, out_channels, temb_channels, num_layers)
        self.nonlinearity = get_activation(non_linearity) if non_linearity else None
        self.downsample = ConvDownsample1D(out_channels) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        skip = (hidden_states,)
        if self.nonlinearity is not None:
            hidden_states = self.nonlinearity(hidden_states)
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        return hidden_states, skip


class UpResnetBlock1D(nn.Module):
    """Concatenate the skip, temporal residual blocks, optional activation, optional transposed-conv upsample."""

    def __init__(self, in_channels: int, out_channels: int | None = None, num_layers: int = 1,
                 temb_channels: int = 32, non_linearity: str | None = None, add_upsample: bool = True):
        super().__init__()
        out_channels = out_channels or in_channels
        self.resnets = _temporal_stack(2 * in_channels, out_channels, temb_channels, num_layers)
        self.nonlinearity = get_activation(non_linearity) if non_linearity else None
        self.upsample = ConvUpsample1D(out_channels, use_conv_transpose=True) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...] | None = None,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        if res_hidden_states_tuple is not None:
            hidden_states = torch.cat((hidden_states, res_hidden_states_tuple[-1]), dim=1)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.nonlinearity is not None:
            hidden_states = self.nonlinearity(hidden_states)
        if self.upsample is not None:
            hidden_states = self.upsample(hidden_states)
        return hidden_states


class MidResTemporalBlock1D(nn.Module):
    """Temporal residual blocks with an optional conv down- or upsample (not both)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, num_layers: int = 1,
                 add_downsample: bool = False, add_upsample: bool = False):
        super().__init__()
        if add_downsample and add_upsample:
            raise ValueError("MidResTemporalBlock1D cannot both downsample and upsample")
        self.resnets = _temporal_stack(in_channels, out_channels, embed_dim, num_layers)
        self.upsample = ConvUpsample1D(out_channels) if add_upsample else None
        self.downsample = ConvDownsample1D(out_channels) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.upsample is not None:
            hidden_states = self.upsample(hidden_states)
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        return hidden_states


class ValueFunctionMidBlock1D(nn.Module):
    """Two temporal residual blocks halving the channels, each followed by a stride-2 conv downsample."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.res1 = ResidualTemporalBlock1D(in_channels, in_channels // 2, embed_dim=embed_dim)
        self.down1 = ConvDownsample1D(out_channels // 2)
        self.res2 = ResidualTemporalBlock1D(in_channels // 2, in_channels // 4, embed_dim=embed_dim)
        self.down2 = ConvDownsample1D(out_channels // 4)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.down1(self.res1(x, temb))
        return self.down2(self.res2(x, temb))


class OutConv1DBlock(nn.Module):
    """conv5 -> GroupNorm -> activation -> conv1 to ``out_channels``."""

    def __init__(self, num_groups_out: int, out_channels: int, embed_dim: int, act_fn: str):
        super().__init__()
        self.final_conv1d_1 = Conv1d(embed_dim, embed_dim, 5, padding=2)
        self.final_conv1d_gn = GroupNorm(num_groups_out, embed_dim)
        self.final_conv1d_act = get_activation(act_fn)
        self.final_conv1d_2 = Conv1d(embed_dim, out_channels, 1)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = _group_norm_1d(self.final_conv1d_gn, self.final_conv1d_1(hidden_states))
        return self.final_conv1d_2(self.final_conv1d_act(x))


class OutValueFunctionBlock(nn.Module):
    """Flatten, append the time embedding, then a two-layer MLP to one value per sample."""

    def __init__(self, fc_dim: int, embed_dim: int, act_fn: str = "mish"):
        super().__init__()
        self.final_block = nn.ModuleList(
            [Linear(fc_dim + embed_dim, fc_dim // 2), get_activation(act_fn), Linear(fc_dim // 2, 1)]
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.cat((hidden_states.reshape(hidden_states.shape[0], -1), temb), dim=-1)
        for layer in self.final_block:
            hidden_states = layer(hidden_states)
        return hidden_states


_DOWN_BLOCKS = {"DownBlock1D": DownBlock1D, "AttnDownBlock1D": AttnDownBlock1D, "DownBlock1DNoSkip": DownBlock1DNoSkip}
_UP_BLOCKS = {"UpBlock1D": UpBlock1D, "AttnUpBlock1D": AttnUpBlock1D, "UpBlock1DNoSkip": UpBlock1DNoSkip}


def get_down_block(down_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int, add_downsample: bool) -> nn.Module:
    if down_block_type == "DownResnetBlock1D":
        return DownResnetBlock1D(in_channels, out_channels, num_layers=num_layers, temb_channels=temb_channels,
                                 add_downsample=add_downsample)
    if down_block_type in _DOWN_BLOCKS:
        return _DOWN_BLOCKS[down_block_type](out_channels=out_channels, in_channels=in_channels)
    raise ValueError(f"down_block_types: unknown block {down_block_type!r}")


def get_up_block(up_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                 temb_channels: int, add_upsample: bool) -> nn.Module:
    if up_block_type == "UpResnetBlock1D":
        return UpResnetBlock1D(in_channels, out_channels, num_layers=num_layers, temb_channels=temb_channels,
                               add_upsample=add_upsample)
    if up_block_type in _UP_BLOCKS:
        return _UP_BLOCKS[up_block_type](in_channels=in_channels, out_channels=out_channels)
    raise ValueError(f"up_block_types: unknown block {up_block_type!r}")


def get_mid_block(mid_block_type: str, num_layers: int, in_channels: int, mid_channels: int, out_channels: int,
                  embed_dim: int, add_downsample: bool) -> nn.Module:
    if mid_block_type == "MidResTemporalBlock1D":
        return MidResTemporalBlock1D(in_channels, out_channels, embed_dim, num_layers=num_layers,
                                     add_downsample=add_downsample)
    if mid_block_type == "ValueFunctionMidBlock1D":
        return ValueFunctionMidBlock1D(in_channels, out_channels, embed_dim)
    if mid_block_type == "UNetMidBlock1D":
        return UNetMidBlock1D(mid_channels=mid_channels, in_channels=in_channels, out_channels=out_channels)
    raise ValueError(f"mid_block_type: unknown block {mid_block_type!r}")


def get_out_block(*, out_block_type: str | None, num_groups_out: int, embed_dim: int, out_channels: int,
                  act_fn: str, fc_dim: int) -> nn.Module | None:
    if out_block_type == "OutConv1DBlock":
        return OutConv1DBlock(num_groups_out, out_channels, embed_dim, act_fn)
    if out_block_type == "ValueFunction":
        return OutValueFunctionBlock(fc_dim, embed_dim, act_fn)
    if out_block_type is None:
        return None
    raise ValueError(f"out_block_type: unknown block {out_block_type!r}")
