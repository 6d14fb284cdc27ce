"""Pieces shared by the autoencoders: Encoder/Decoder stacks, latent distributions, vector quantizer.

:class:`Encoder` and :class:`Decoder` serve both :class:`~diffusekit.models.autoencoder_kl.AutoencoderKL`
(``double_z=True``: the encoder outputs mean and log-variance) and
:class:`~diffusekit.models.vq_model.VQModel`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..utils import BaseOutput, Generator, randn_tensor
from .layers import Conv2d, Embedding, GroupNorm, loading
from .modeling import maybe_checkpoint
from .unet_blocks import UNetMidBlock2D, get_down_block, get_up_block

logger = logging.getLogger(__name__)


@dataclass
class DecoderOutput(BaseOutput):
    """``sample``: decoded images ``(batch, channels, height, width)``; ``commit_loss``: VQ loss, if any."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


def _check_norm_type(norm_type: str) -> None:
    if norm_type != "group":
        raise ValueError(f"norm_type {norm_type!r} is not supported; only 'group' is implemented")


class Encoder(nn.Module):
    """``conv_in`` -> down blocks -> mid block (resnets [+ attention]) -> GroupNorm, SiLU, ``conv_out``."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels):
            raise ValueError(
                f"down_block_types ({len(down_block_types)}) and block_out_channels ({len(block_out_channels)}) "
                "must have the same length"
            )
        self.gradient_checkpointing = False
        self.conv_in = Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=input_channel, out_channels=output_channel,
                add_downsample=i < len(block_out_channels) - 1, resnet_eps=1e-6, downsample_padding=0,
                resnet_act_fn=act_fn, resnet_groups=norm_num_groups, attention_head_dim=output_channel,
                temb_channels=None,
            ))
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], resnet_eps=1e-6, resnet_act_fn=act_fn, output_scale_factor=1,
            resnet_time_scale_shift="default", attention_head_dim=block_out_channels[-1],
            resnet_groups=norm_num_groups, temb_channels=None, add_attention=mid_block_add_attention,
        )
        self.conv_norm_out = GroupNorm(num_channels=block_out_channels[-1], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = maybe_checkpoint(self, block, sample)
        sample = maybe_checkpoint(self, self.mid_block, sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """``conv_in`` -> mid block -> up blocks (``layers_per_block + 1`` resnets each) -> GroupNorm, SiLU, ``conv_out``."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_norm_type(norm_type)
        if len(up_block_types) != len(block_out_channels):
            raise ValueError(
                f"up_block_types ({len(up_block_types)}) and block_out_channels ({len(block_out_channels)}) "
                "must have the same length"
            )
        self.gradient_checkpointing = False
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block: the reference's state-dict order
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], resnet_eps=1e-6, resnet_act_fn=act_fn, output_scale_factor=1,
            resnet_time_scale_shift="default", attention_head_dim=block_out_channels[-1],
            resnet_groups=norm_num_groups, temb_channels=None, add_attention=mid_block_add_attention,
        )
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block + 1, in_channels=prev_output_channel,
                out_channels=output_channel, prev_output_channel=prev_output_channel,
                add_upsample=i < len(block_out_channels) - 1, resnet_eps=1e-6, resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups, attention_head_dim=output_channel, temb_channels=None,
                resnet_time_scale_shift="default",
            ))
        self.conv_norm_out = GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = maybe_checkpoint(self, self.mid_block, self.conv_in(sample))
        for block in self.up_blocks:
            sample = maybe_checkpoint(self, block, sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class DiagonalGaussianDistribution:
    """A diagonal Gaussian whose mean and log-variance are the two channel halves of ``parameters``.

    The log-variance is clamped to ``[-30, 20]``. ``deterministic=True`` makes ``std`` and ``var`` zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """``mean + std * noise``, the noise drawn with :func:`~diffusekit.utils.randn_tensor`."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                             dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL divergence to ``other`` (the standard normal when ``None``), summed over C, H, W."""
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            terms = torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar
        else:
            terms = (torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * torch.sum(terms, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.Tensor([0.0])
        terms = math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var
        return 0.5 * torch.sum(terms, dim=list(dims))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer (``embedding``) with the reference's loss and index remapping.

    ``legacy=True`` keeps the original (swapped) placement of ``beta`` in the commitment loss. ``remap``
    names a ``.npy`` file of used codebook indices (buffer ``used``); indices outside it map to
    ``unknown_index`` (``"random"``, ``"extra"`` or an int).
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float, remap: str | None = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False, legacy: bool = True):
        super().__init__()
        self.n_e = n_e
        self.vq_embed_dim = vq_embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = Embedding(n_e, vq_embed_dim)
        if not loading():
            nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap, allow_pickle=False)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            logger.info("remapping %d indices to %d; unknown indices -> %s", n_e, self.re_embed, self.unknown_index)
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.LongTensor) -> torch.LongTensor:
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        match = (inds[:, :, None] == self.used.to(inds)[None, None, :]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.LongTensor) -> torch.LongTensor:
        shape = inds.shape
        inds = inds.reshape(shape[0], -1).clone()
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:  # the "extra" token maps to entry 0
            inds[inds >= used.shape[0]] = 0
        back = torch.gather(used[None, :].expand(inds.shape[0], -1), 1, inds)
        return back.reshape(shape)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Quantize ``z`` ``(B, C, H, W)``; returns ``(z_q, loss, (None, None, indices))``."""
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.vq_embed_dim)
        indices = torch.argmin(torch.cdist(flat, self.embedding.weight), dim=1)
        z_q = self.embedding(indices).view(z.shape)
        codebook_term = torch.mean((z_q - z.detach()) ** 2)
        commit_term = torch.mean((z_q.detach() - z) ** 2)
        if self.legacy:
            loss = commit_term + self.beta * codebook_term
        else:
            loss = self.beta * commit_term + codebook_term
        z_q = z + (z_q - z).detach()  # straight-through gradients (and the reference's rounding)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.LongTensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Codebook vectors for ``indices``; with ``shape`` ``(B, H, W, C)`` returned as ``(B, C, H, W)``."""
        if self.remap is not None:
            if shape is None:
                raise ValueError("shape is required to look up remapped indices")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class AutoencoderMixin:
    """``enable/disable_slicing`` (one batch item at a time) and ``enable/disable_tiling`` switches.

    A model supports a switch by setting ``use_slicing`` / ``use_tiling`` in its ``__init__``.
    """

    def _switch(self, name: str, value: bool) -> None:
        if not hasattr(self, name):
            raise NotImplementedError(f"{type(self).__name__} does not support {name[4:]}")
        setattr(self, name, value)

    def enable_tiling(self) -> None:
        """Encode and decode large inputs tile by tile, blending the overlaps."""
        self._switch("use_tiling", True)

    def disable_tiling(self) -> None:
        self._switch("use_tiling", False)

    def enable_slicing(self) -> None:
        """Encode and decode a batch one item at a time."""
        self._switch("use_slicing", True)

    def disable_slicing(self) -> None:
        self._switch("use_slicing", False)
