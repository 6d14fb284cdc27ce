"""VQModel: the vector-quantised autoencoder of latent diffusion (LDM) pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configuration import register_to_config
from ..utils import BaseOutput
from .layers import Conv2d
from .attention import LEGACY_ATTENTION_RENAMES
from .attention_processor import AttentionProcessorMixin
from .modeling import ModelMixin
from .vae import AutoencoderMixin, Decoder, DecoderOutput, Encoder, VectorQuantizer, _check_norm_type


@dataclass
class VQEncoderOutput(BaseOutput):
    """``latents``: encoder output ``(batch, vq_embed_dim, height, width)`` before quantization."""

    latents: torch.Tensor


class VQModel(ModelMixin, AutoencoderMixin, AttentionProcessorMixin):
    """VQ-VAE: ``encode(x).latents`` (unquantized), ``decode(h)`` quantizes to the codebook then decodes.

    ``decode(h, force_not_quantize=True)`` skips quantization, or, with ``lookup_from_codebook``,
    treats ``h`` as codebook indices laid out as ``shape`` ``(B, H, W, C)``.
    """

    legacy_key_renames = LEGACY_ATTENTION_RENAMES

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
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ):
        super().__init__()
        _check_norm_type(norm_type)
        self.encoder = Encoder(
            in_channels=in_channels, out_channels=latent_channels, down_block_types=down_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, double_z=False, mid_block_add_attention=mid_block_add_attention,
        )
        vq_embed_dim = vq_embed_dim or latent_channels
        self.quant_conv = Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, remap=None, sane_index_shape=False)
        self.post_quant_conv = Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, norm_type=norm_type, mid_block_add_attention=mid_block_add_attention,
        )

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple:
        """Encode images to (unquantized) latents."""
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape: tuple[int, ...] | None = None) -> DecoderOutput | tuple:
        """Quantize ``h`` (unless ``force_not_quantize``) and decode; also returns the commitment loss."""
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        else:
            if self.config.lookup_from_codebook:
                quant = self.quantize.get_codebook_entry(h, shape)
            else:
                quant = h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        dec = self.decoder(self.post_quant_conv(quant))
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode, quantize and decode ``sample``."""
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)
