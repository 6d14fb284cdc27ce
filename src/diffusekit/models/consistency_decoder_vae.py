"""ConsistencyDecoderVAE: Stable Diffusion's KL encoder with OpenAI's consistency decoder (DALL-E 3).

Decoding is sampling: the latents, normalised and upsampled to pixel size, condition a UNet
(:class:`~diffusekit.models.unet_2d.UNet2DModel`) that turns noise into the image in two
:class:`~diffusekit.schedulers.scheduling_consistency_decoder.ConsistencyDecoderScheduler` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configuration import register_to_config
from ..schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler
from ..utils import Generator, randn_tensor
from .attention_processor import AttentionProcessorMixin
from .autoencoder_kl import AutoencoderKLOutput, KLEncodingMixin, init_slicing_and_tiling
from .layers import Conv2d
from .modeling import ModelMixin
from .unet_2d import UNet2DModel
from .vae import AutoencoderMixin, DecoderOutput, Encoder

#: Per-channel statistics of SD latents (times ``scaling_factor``) that the decoder was trained on.
LATENT_MEANS = (0.38862467, 0.02253063, 0.07381133, -0.0171294)
LATENT_STDS = (0.9654121, 1.0440036, 0.76147926, 0.77022034)
#: The decoder UNet's input is the noisy image (these channels) followed by the upsampled latents.
IMAGE_CHANNELS = 3
#: Config keys set from the others after ``__init__`` (read by pipelines), not ``__init__`` arguments.
DERIVED_CONFIG_KEYS = ("block_out_channels", "force_upcast")


@dataclass
class ConsistencyDecoderVAEOutput(AutoencoderKLOutput):
    """``latent_dist``: the :class:`~diffusekit.models.vae.DiagonalGaussianDistribution` of the latents."""


class ConsistencyDecoderVAE(ModelMixin, AutoencoderMixin, KLEncodingMixin, AttentionProcessorMixin):
    """VAE whose decoder is a consistency model: ``encode(x).latent_dist``, ``decode(z, generator).sample``.

    ``encoder_*`` arguments configure the KL encoder (as :class:`~diffusekit.AutoencoderKL`'s),
    ``decoder_*`` ones the decoder's :class:`~diffusekit.UNet2DModel`. The config also holds
    ``block_out_channels`` (the encoder's, for the pipelines' scale factor) and ``force_upcast=False``.
    ``decode`` draws noise (from ``generator``), so two decodes differ unless seeded alike.
    Slicing and tiling apply to encoding only.
    """

    derived_config_keys = DERIVED_CONFIG_KEYS
    encoder_output = ConsistencyDecoderVAEOutput

    @register_to_config
    def __init__(
        self,
        scaling_factor: float = 0.18215,
        latent_channels: int = 4,
        sample_size: int = 32,
        encoder_act_fn: str = "silu",
        encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        encoder_double_z: bool = True,
        encoder_down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        encoder_in_channels: int = 3,
        encoder_layers_per_block: int = 2,
        encoder_norm_num_groups: int = 32,
        encoder_out_channels: int = 4,
        decoder_add_attention: bool = False,
        decoder_block_out_channels: tuple[int, ...] = (320, 640, 1024, 1024),
        decoder_down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock2D",) * 4,
        decoder_downsample_padding: int = 1,
        decoder_in_channels: int = 7,
        decoder_layers_per_block: int = 3,
        decoder_norm_eps: float = 1e-05,
        decoder_norm_num_groups: int = 32,
        decoder_num_train_timesteps: int = 1024,
        decoder_out_channels: int = 6,
        decoder_resnet_time_scale_shift: str = "scale_shift",
        decoder_time_embedding_type: str = "learned",
        decoder_up_block_types: tuple[str, ...] = ("ResnetUpsampleBlock2D",) * 4,
    ):
        super().__init__()
        self.encoder = Encoder(
            in_channels=encoder_in_channels, out_channels=encoder_out_channels,
            down_block_types=encoder_down_block_types, block_out_channels=encoder_block_out_channels,
            layers_per_block=encoder_layers_per_block, norm_num_groups=encoder_norm_num_groups,
            act_fn=encoder_act_fn, double_z=encoder_double_z,
        )
        self.decoder_unet = UNet2DModel(
            in_channels=decoder_in_channels, out_channels=decoder_out_channels,
            down_block_types=decoder_down_block_types, up_block_types=decoder_up_block_types,
            block_out_channels=decoder_block_out_channels, layers_per_block=decoder_layers_per_block,
            downsample_padding=decoder_downsample_padding, norm_eps=decoder_norm_eps,
            norm_num_groups=decoder_norm_num_groups, num_train_timesteps=decoder_num_train_timesteps,
            resnet_time_scale_shift=decoder_resnet_time_scale_shift,
            time_embedding_type=decoder_time_embedding_type, add_attention=decoder_add_attention,
        )
        self.decoder_scheduler = ConsistencyDecoderScheduler()
        self.register_to_config(block_out_channels=encoder_block_out_channels, force_upcast=False)
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1)

        init_slicing_and_tiling(self, sample_size, len(encoder_block_out_channels))

    @property
    def means(self) -> torch.Tensor:
        """:data:`LATENT_MEANS` as a ``(1, C, 1, 1)`` tensor on the model's device and dtype."""
        return self._channel_constants(LATENT_MEANS)

    @property
    def stds(self) -> torch.Tensor:
        """:data:`LATENT_STDS` as a ``(1, C, 1, 1)`` tensor on the model's device and dtype."""
        return self._channel_constants(LATENT_STDS)

    def _channel_constants(self, values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values).view(1, -1, 1, 1).to(device=self.device, dtype=self.dtype)

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, z: torch.Tensor, generator: Generator = None, return_dict: bool = True,
               num_inference_steps: int = 2) -> DecoderOutput | tuple:
        """Sample images for latents ``z`` ``(B, latent_channels, h, w)`` in ``num_inference_steps`` (2)."""
        scheduler = self.decoder_scheduler.for_call()
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        condition = (z * self.config.scaling_factor - self.means) / self.stds
        condition = F.interpolate(condition, mode="nearest",
                                  scale_factor=2 ** (len(self.config.block_out_channels) - 1))
        batch, _, height, width = condition.shape
        noise = randn_tensor((batch, IMAGE_CHANNELS, height, width), generator=generator,
                             dtype=condition.dtype, device=condition.device)
        x_t = scheduler.init_noise_sigma * noise
        for t in scheduler.timesteps:
            model_input = torch.cat([scheduler.scale_model_input(x_t, t), condition], dim=1)
            model_output = self.decoder_unet(model_input, t).sample[:, :IMAGE_CHANNELS]
            x_t = scheduler.step(model_output, t, x_t, generator).prev_sample
        return DecoderOutput(sample=x_t) if return_dict else (x_t,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Generator = None) -> DecoderOutput | tuple:
        """Encode then decode ``sample`` (through a posterior sample or its mode)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z, generator=generator).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
