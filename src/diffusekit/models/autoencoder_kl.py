"""AutoencoderKL: the KL-regularised VAE of Stable Diffusion and FLUX."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..configuration import register_to_config
from ..loaders.single_file_model import FromOriginalModelMixin
from ..utils import BaseOutput, Generator
from .layers import Conv2d
from .attention import LEGACY_ATTENTION_RENAMES
from .attention_processor import AttentionProcessorMixin
from .modeling import ModelMixin
from .vae import AutoencoderMixin, Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder


@dataclass
class AutoencoderKLOutput(BaseOutput):
    """``latent_dist``: the :class:`~diffusekit.models.vae.DiagonalGaussianDistribution` of the latents."""

    latent_dist: DiagonalGaussianDistribution


def _blend(a: torch.Tensor, b: torch.Tensor, blend_extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the end of ``a`` into the start of ``b`` along ``dim`` (2: rows, 3: columns), in place on ``b``."""
    extent = min(a.shape[dim], b.shape[dim], blend_extent)
    if extent <= 0:
        return b
    # weights rounded from float64 exactly as the reference's Python-float arithmetic does
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1] * b.ndim
    shape[dim] = extent
    w_b = ramp.to(b.dtype).to(b.device).view(shape)
    w_a = (1 - ramp).to(b.dtype).to(b.device).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * w_a + head * w_b)
    return b


def init_slicing_and_tiling(vae: ModelMixin, sample_size, levels: int) -> None:
    """Slicing and tiling off; tile sizes from ``sample_size`` (an int or a pair) and ``levels`` down-levels."""
    vae.use_slicing = False
    vae.use_tiling = False
    size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    vae.tile_sample_min_size = size
    vae.tile_latent_min_size = int(size / (2 ** (levels - 1)))
    vae.tile_overlap_factor = 0.25


def _tiled(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile_in: int, tile_out: int,
           overlap_factor: float) -> torch.Tensor:
    """Run ``fn`` on overlapping ``tile_in`` tiles of ``x``, blend neighbours, keep a ``tile_out`` grid."""
    stride = int(tile_in * (1 - overlap_factor))
    blend_extent = int(tile_out * overlap_factor)
    row_limit = tile_out - blend_extent
    rows = [
        [fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    # blending happens in place, so later tiles blend with already-blended neighbours (as the reference)
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend_extent, dim=2)
            if j > 0:
                _blend(row[j - 1], tile, blend_extent, dim=3)
            kept.append(tile[:, :, :row_limit, :row_limit])
        out_rows.append(torch.cat(kept, dim=3))
    return torch.cat(out_rows, dim=2)


class KLEncodingMixin:
    """``encode`` / ``tiled_encode`` to a diagonal-Gaussian latent, for a model with ``encoder``,
    ``quant_conv`` (or None) and the switches of :func:`init_slicing_and_tiling`: slicing encodes
    one batch item at a time, tiling splits images larger than ``tile_sample_min_size``. The result
    is an ``encoder_output``."""

    encoder_output = AutoencoderKLOutput

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_min_size
        if self.use_tiling and (x.shape[-1] > size or x.shape[-2] > size):
            return self._tiled_encode(x)
        return self._encode_tile(x)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        return _tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size,
                      self.tile_overlap_factor)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode images ``(B, C, H, W)`` to the latent distribution."""
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            h = self._encode(x)
        posterior = DiagonalGaussianDistribution(h)
        return self.encoder_output(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode ``x`` tile by tile (whatever its size)."""
        posterior = DiagonalGaussianDistribution(self._tiled_encode(x))
        return self.encoder_output(latent_dist=posterior) if return_dict else (posterior,)


class AutoencoderKL(ModelMixin, AutoencoderMixin, KLEncodingMixin, AttentionProcessorMixin, FromOriginalModelMixin):
    """VAE with a diagonal-Gaussian latent: ``encode(x).latent_dist`` and ``decode(z).sample``.

    ``quant_conv`` / ``post_quant_conv`` (1x1 convs around the latent) are absent with
    ``use_quant_conv=False`` / ``use_post_quant_conv=False`` (FLUX). ``scaling_factor``,
    ``shift_factor``, ``latents_mean`` and ``latents_std`` are stored for pipelines; the model itself
    does not apply them. Tiling splits inputs larger than ``tile_sample_min_size`` (latents larger than
    ``tile_latent_min_size``) into tiles overlapping by ``tile_overlap_factor`` and blends them.
    """

    _supports_gradient_checkpointing = True

    legacy_key_renames = LEGACY_ATTENTION_RENAMES
    single_file_component = "vae"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels, out_channels=latent_channels, down_block_types=down_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, double_z=True, mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups, act_fn=act_fn, mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        init_slicing_and_tiling(self, sample_size, len(block_out_channels))

    # -- decoding -------------------------------------------------------------------------------

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        size = self.tile_latent_min_size
        if self.use_tiling and (z.shape[-1] > size or z.shape[-2] > size):
            return self.tiled_decode(z).sample
        return self._decode_tile(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Generator = None) -> DecoderOutput | tuple:
        """Decode latents ``(B, latent_channels, h, w)`` to images."""
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode ``z`` tile by tile (whatever its size)."""
        decoded = _tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size,
                         self.tile_overlap_factor)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def blend_v(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """Blend the bottom rows of ``a`` into the top rows of ``b`` (in place on ``b``)."""
        return _blend(a, b, blend_extent, dim=2)

    def blend_h(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """Blend the right columns of ``a`` into the left columns of ``b`` (in place on ``b``)."""
        return _blend(a, b, blend_extent, dim=3)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Generator = None) -> DecoderOutput | tuple:
        """Encode then decode ``sample`` (through a posterior sample or its mode)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
