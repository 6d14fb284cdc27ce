"""Seeded initialisation: ``torch.manual_seed(0); Cls(**config)`` gives the reference's weights, for every
model class diffusekit exports (same parameter creation order and init, same state-dict key order)."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as RefLDMBert
from transformers import CLIPConfig

import diffusekit

DDPM = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
            attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
NCSNPP = dict(block_out_channels=(32, 64, 64), layers_per_block=1, time_embedding_type="fourier",
              norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2.0), norm_num_groups=None,
              down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
              up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"))
SD = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=2, cross_attention_dim=8,
          attention_head_dim=2, sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONTROLNET = dict({k: v for k, v in SD.items() if k not in ("sample_size", "up_block_types")},
                  conditioning_embedding_out_channels=(4, 8))
VAE = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))

CASES = {
    "unet2d_ddpm": ("UNet2DModel", DDPM),
    "unet2d_resnet_resampling_class_embeds": ("UNet2DModel", dict(
        DDPM, downsample_type="resnet", upsample_type="resnet", num_class_embeds=3, attn_norm_num_groups=2)),
    "unet2d_timestep_class_scale_shift": ("UNet2DModel", dict(
        DDPM, class_embed_type="timestep", resnet_time_scale_shift="scale_shift", time_embedding_type="learned",
        num_train_timesteps=10)),
    "unet2d_ncsnpp_fourier": ("UNet2DModel", NCSNPP),
    "unet2d_condition_sd": ("UNet2DConditionModel", SD),
    "unet2d_condition_linear_layers_list": ("UNet2DConditionModel", dict(
        SD, use_linear_projection=True, transformer_layers_per_block=(2, 1), class_embed_type="timestep",
        only_cross_attention=True)),
    "unet2d_condition_sdxl_text_time": ("UNet2DConditionModel", dict(
        SD, use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)),
    "unet2d_condition_unet_mid_block": ("UNet2DConditionModel", dict(
        SD, mid_block_type="UNetMidBlock2D", time_embedding_type="fourier", time_embedding_dim=16)),
    "autoencoder_kl": ("AutoencoderKL", VAE),
    "autoencoder_kl_no_mid_attention_no_quant": ("AutoencoderKL", dict(
        VAE, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)),
    "vq_model": ("VQModel", dict(VAE, num_vq_embeddings=12, vq_embed_dim=3)),
    "unet1d_rl": ("UNet1DModel", dict(
        block_out_channels=(8, 8, 16, 16), in_channels=4, out_channels=4, time_embedding_type="positional",
        use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1.0, out_block_type="OutConv1DBlock",
        mid_block_type="MidResTemporalBlock1D", down_block_types=("DownResnetBlock1D",) * 4,
        up_block_types=("UpResnetBlock1D",) * 3, act_fn="swish")),
    "unet1d_value_function": ("UNet1DModel", dict(
        in_channels=6, out_channels=6, down_block_types=("DownResnetBlock1D",) * 4, up_block_types=(),
        out_block_type="ValueFunction", mid_block_type="ValueFunctionMidBlock1D", block_out_channels=(8, 16, 32, 64),
        layers_per_block=1, downsample_each_block=True, use_timestep_embedding=True, freq_shift=1.0,
        flip_sin_to_cos=False, time_embedding_type="positional", act_fn="mish")),
    "unet1d_dance_diffusion": ("UNet1DModel", dict(
        in_channels=2, out_channels=2, extra_in_channels=16, sample_size=64, block_out_channels=(32, 32, 64),
        time_embedding_type="fourier", use_timestep_embedding=False, flip_sin_to_cos=True, freq_shift=0.0,
        down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"), mid_block_type="UNetMidBlock1D",
        out_block_type=None, act_fn=None)),
    "controlnet_sd": ("ControlNetModel", CONTROLNET),
    "controlnet_sdxl_text_time_class_mid": ("ControlNetModel", dict(
        CONTROLNET, layers_per_block=1, use_linear_projection=True,
        transformer_layers_per_block=(2, 1), addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4, class_embed_type="timestep", mid_block_type="UNetMidBlock2D")),
    "flux": ("FluxTransformer2DModel", FLUX),
    "flux_guidance": ("FluxTransformer2DModel", dict(FLUX, guidance_embeds=True)),
}


def _assert_same_weights(reference: torch.nn.Module, ours: torch.nn.Module) -> None:
    expected, actual = reference.state_dict(), ours.state_dict()
    assert list(actual) == list(expected)
    differing = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert differing == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_seeded_build_gives_the_reference_weights(case):
    name, config = CASES[case]
    torch.manual_seed(0)
    reference = getattr(diffusers, name)(**config)
    reference_rng = torch.get_rng_state()
    torch.manual_seed(0)
    ours = getattr(diffusekit, name)(**config)
    _assert_same_weights(reference, ours)
    assert torch.equal(torch.get_rng_state(), reference_rng)  # as many draws: later seeded code agrees too


def test_seeded_ldm_bert_gives_the_reference_weights():
    config = dict(d_model=16, encoder_attention_heads=2, head_dim=8, encoder_ffn_dim=24, encoder_layers=2,
                  vocab_size=50, max_position_embeddings=12, pad_token_id=1, init_std=0.05)
    torch.manual_seed(0)
    reference = RefLDMBert(LDMBertConfig(**config))
    torch.manual_seed(0)
    _assert_same_weights(reference, diffusekit.LDMBertModel(**config))


def test_seeded_safety_checker_gives_the_reference_weights():
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    reference = diffusers.pipelines.stable_diffusion.safety_checker.StableDiffusionSafetyChecker(config)
    torch.manual_seed(0)
    _assert_same_weights(reference, diffusekit.StableDiffusionSafetyChecker(config))
