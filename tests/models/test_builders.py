"""UNet2DConditionModel's builders: seeded init and state dict keys (checksums of the weights the reference's
class gives for the same seed, recorded with diffusers 0.42.1), and keyword-only block constructors."""

import hashlib

import pytest
import torch

from diffusekit.models import unet_blocks
from diffusekit.models.unet_2d_condition import BlockSettings, UNet2DConditionModel, build_down_blocks

SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
           norm_num_groups=8, cross_attention_dim=24, attention_head_dim=(2, 4),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    "sd1": (SD1, 208, "d176296ddf4883ec"),
    "sdxl": (dict(SD1, use_linear_projection=True, transformer_layers_per_block=(1, 2),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
             292, "0b6bb07be0c1d45d"),
    "extras": (dict(SD1, num_class_embeds=5, time_cond_proj_dim=6, time_embedding_act_fn="silu",
                    timestep_post_act="silu", conv_in_kernel=1, conv_out_kernel=1,
                    only_cross_attention=(True, False), resnet_time_scale_shift="scale_shift",
                    encoder_hid_dim=12, mid_block_type="UNetMidBlock2D"),
               176, "05fcb9b765ff4949"),
    "fourier": (dict(SD1, time_embedding_type="fourier", mid_block_type=None, class_embed_type="timestep"),
                167, "eba377baf1e33ac5"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_seeded_init_and_keys_are_unchanged(name):
    config, count, digest = CONFIGS[name]
    torch.manual_seed(0)
    state = UNet2DConditionModel(**config).state_dict()
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    assert (len(state), h.hexdigest()[:16]) == (count, digest)


def test_down_path_builder_is_reusable_alone():
    settings = BlockSettings.from_config(2, only_cross_attention=False, attention_head_dim=2, cross_attention_dim=24,
                                         layers_per_block=1, transformer_layers_per_block=1)
    blocks = build_down_blocks(SD1["down_block_types"], (32, 64), settings, downsample_padding=1, temb_channels=128,
                               resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=8)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD1)
    assert [type(b) for b in blocks] == [type(b) for b in model.down_blocks]
    assert list(blocks.state_dict()) == list(model.down_blocks.state_dict())
    with pytest.raises(ValueError, match="layers_per_block has 3 entries"):
        BlockSettings.from_config(2, only_cross_attention=False, attention_head_dim=2, cross_attention_dim=24,
                                  layers_per_block=(1, 1, 1), transformer_layers_per_block=1)


@pytest.mark.parametrize("cls", [unet_blocks.DownBlock2D, unet_blocks.CrossAttnDownBlock2D, unet_blocks.UpBlock2D,
                                 unet_blocks.CrossAttnUpBlock2D, unet_blocks.UNetMidBlock2D,
                                 unet_blocks.DownEncoderBlock2D, unet_blocks.AttnUpDecoderBlock2D])
def test_block_constructors_are_keyword_only(cls):
    with pytest.raises(TypeError, match="positional"):
        cls(8, 8, 16)


def test_dead_parameters_are_gone():
    with pytest.raises(TypeError, match="resnet_pre_norm"):
        unet_blocks.DownBlock2D(in_channels=8, out_channels=8, temb_channels=None, resnet_groups=4,
                                resnet_pre_norm=True)
