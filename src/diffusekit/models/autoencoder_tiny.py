"""AutoencoderTiny: TAESD, a small distilled VAE of plain conv + ReLU residual blocks.

Its latents are used as they come (``scaling_factor`` 1.0); ``scale_latents`` maps them to
``[0, 1]`` (storable as bytes) and ``unscale_latents`` back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configuration import register_to_config
from ..utils import BaseOutput, Generator
from .embeddings import get_activation
from .layers import Conv2d
from .modeling import ModelMixin
from .vae import AutoencoderMixin, DecoderOutput

#: Config keys set after ``__init__`` (read by pipelines), not ``__init__`` arguments.
DERIVED_CONFIG_KEYS = ("block_out_channels",)
#: The decoder squashes incoming latents into ``(-LATENT_CLAMP, LATENT_CLAMP)`` with a tanh.
LATENT_CLAMP = 3.0


@dataclass
class AutoencoderTinyOutput(BaseOutput):
    """``latents``: the encoder's output ``(batch, latent_channels, height / 8, width / 8)``."""

    latents: torch.Tensor


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convs (activation between them) plus a skip (1x1 conv when widths differ), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        act = get_activation(act_fn)
        self.conv = nn.Sequential(
            Conv2d(in_channels, out_channels, 3, padding=1), act,
            Conv2d(out_channels, out_channels, 3, padding=1), act,
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else Conv2d(in_channels, out_channels, 1, bias=False)
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def _check_stages(name: str, block_out_channels: tuple[int, ...], num_blocks: tuple[int, ...]) -> None:
    if len(block_out_channels) != len(num_blocks):
        raise ValueError(f"{name}_block_out_channels has {len(block_out_channels)} entries but "
                         f"num_{name}_blocks has {len(num_blocks)}; they must have the same length")


class EncoderTiny(nn.Module):
    """Images in ``[-1, 1]`` to latents: per stage a conv (stride 2 after the first) and its blocks."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: tuple[int, ...],
                 block_out_channels: tuple[int, ...], act_fn: str):
        super().__init__()
        layers: list[nn.Module] = []
        for stage, (count, width) in enumerate(zip(num_blocks, block_out_channels)):
            if stage == 0:
                layers.append(Conv2d(in_channels, width, 3, padding=1))
            else:
                layers.append(Conv2d(width, width, 3, padding=1, stride=2, bias=False))
            layers.extend(AutoencoderTinyBlock(width, width, act_fn) for _ in range(count))
        layers.append(Conv2d(block_out_channels[-1], out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))


class DecoderTiny(nn.Module):
    """Latents to images in ``[-1, 1]``: per stage its blocks, an upsample (not after the last) and a conv."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: tuple[int, ...],
                 block_out_channels: tuple[int, ...], upsampling_scaling_factor: int, act_fn: str,
                 upsample_fn: str):
        super().__init__()
        layers: list[nn.Module] = [Conv2d(in_channels, block_out_channels[0], 3, padding=1),
                                   get_activation(act_fn)]
        last = len(num_blocks) - 1
        for stage, (count, width) in enumerate(zip(num_blocks, block_out_channels)):
            layers.extend(AutoencoderTinyBlock(width, width, act_fn) for _ in range(count))
            if stage != last:
                layers.append(nn.Upsample(scale_factor=upsampling_scaling_factor, mode=upsample_fn))
            conv_out = out_channels if stage == last else width
            layers.append(Conv2d(width, conv_out, 3, padding=1, bias=stage == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x / LATENT_CLAMP) * LATENT_CLAMP
        return self.layers(x).mul(2).sub(1)


class AutoencoderTiny(ModelMixin, AutoencoderMixin):
    """TAESD: ``encode(x).latents`` and ``decode(z).sample``, images in ``[-1, 1]``.

    The config also holds ``block_out_channels`` (the decoder's, for the pipelines' scale
    factor); ``force_upcast`` is always stored as False. Slicing is supported, tiling is not.
    """

    derived_config_keys = DERIVED_CONFIG_KEYS

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 4,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: int = 3,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        _check_stages("encoder", encoder_block_out_channels, num_encoder_blocks)
        _check_stages("decoder", decoder_block_out_channels, num_decoder_blocks)
        self.encoder = EncoderTiny(in_channels, latent_channels, num_encoder_blocks,
                                   encoder_block_out_channels, act_fn)
        self.decoder = DecoderTiny(latent_channels, out_channels, num_decoder_blocks,
                                   decoder_block_out_channels, upsampling_scaling_factor, act_fn, upsample_fn)
        self.latent_magnitude = latent_magnitude
        self.latent_shift = latent_shift
        self.scaling_factor = scaling_factor
        self.use_slicing = False
        self.register_to_config(block_out_channels=decoder_block_out_channels, force_upcast=False)

    def scale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latents to ``[0, 1]``: ``x / (2 * latent_magnitude) + latent_shift``, clamped."""
        return x.div(2 * self.latent_magnitude).add(self.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` back to raw latents (inverse of :meth:`scale_latents` inside its range)."""
        return x.sub(self.latent_shift).mul(2 * self.latent_magnitude)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([module(part) for part in x.split(1)])
        return module(x)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderTinyOutput | tuple:
        """Encode images ``(B, in_channels, H, W)`` in ``[-1, 1]`` to latents (sliced when enabled)."""
        latents = self._run(self.encoder, x)
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, x: torch.Tensor, generator: Generator = None, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode latents to images in ``[-1, 1]``; ``generator`` is accepted and unused (no sampling)."""
        images = self._run(self.decoder, x)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode, quantise the latents to 8 bits through :meth:`scale_latents`, and decode."""
        latents = self.encode(sample).latents
        quantised = self.scale_latents(latents).mul(255).round().byte()
        decoded = self.decode(self.unscale_latents(quantised / 255.0)).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
