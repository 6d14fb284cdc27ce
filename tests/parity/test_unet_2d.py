"""UNet2DModel against the reference: tiny DDPM-, NCSN++- and class-conditional configs, both load directions."""

import math

import pytest
import torch
from diffusers import UNet2DModel as RefUNet2DModel
from safetensors.torch import save_file

from diffusekit.models.unet_2d import UNet2DModel

DDPM = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
NCSNPP = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=None,
              attention_head_dim=None, time_embedding_type="fourier", mid_block_scale_factor=math.sqrt(2.0),
              norm_eps=1e-6, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
              up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))
CONFIGS = {
    "ddpm": DDPM,
    "ddpm_resnet_resample_center": dict(DDPM, downsample_type="resnet", upsample_type="resnet",
                                        center_input_sample=True, freq_shift=1, flip_sin_to_cos=False,
                                        attn_norm_num_groups=4, time_embedding_dim=48),
    "ddpm_scale_shift_no_mid_attention": dict(DDPM, resnet_time_scale_shift="scale_shift", add_attention=False),
    "learned_time": dict(DDPM, time_embedding_type="learned", num_train_timesteps=1000),
    "ncsnpp": NCSNPP,
    "ncsnpp_scale_shift": dict(NCSNPP, resnet_time_scale_shift="scale_shift", layers_per_block=2),
    "class_conditional": dict(DDPM, num_class_embeds=10),
    "class_timestep": dict(DDPM, class_embed_type="timestep"),
}


def reference_model(config: dict) -> RefUNet2DModel:
    """A reference model with seeded random weights, nudged so norms and biases are not trivial."""
    torch.manual_seed(0)
    model = RefUNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(config: dict):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 3, 8, 8, generator=generator)
    if config.get("time_embedding_type") == "fourier":
        timestep = torch.tensor([0.5, 3.0])
    else:
        timestep = torch.tensor([10, 900])
    labels = None
    if config.get("num_class_embeds"):
        labels = torch.tensor([1, 7])
    elif config.get("class_embed_type") == "timestep":
        labels = torch.tensor([3, 40])
    return sample, timestep, labels


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_checkpoint_loads_and_matches(name, tmp_path):
    config = CONFIGS[name]
    ref = reference_model(config)
    ref.save_pretrained(tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path)
    sample, timestep, labels = inputs(config)
    expected = ref(sample, timestep, class_labels=labels).sample
    got = ours(sample, timestep, class_labels=labels)
    torch.testing.assert_close(got.sample, expected, rtol=1e-5, atol=1e-5)
    assert got.sample.shape == sample.shape
    torch.testing.assert_close(ours(sample, timestep, labels, return_dict=False)[0], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["ddpm", "ncsnpp", "class_conditional"])
def test_our_save_loads_in_reference(name, tmp_path):
    config = CONFIGS[name]
    ref = reference_model(config)
    ours = UNet2DModel.from_config(config)
    ours.load_checked_state_dict(dict(ref.state_dict()))
    ours.save_pretrained(tmp_path)
    reloaded = RefUNet2DModel.from_pretrained(tmp_path).eval()
    sample, timestep, labels = inputs(config)
    torch.testing.assert_close(reloaded(sample, timestep, labels).sample, ours(sample, timestep, labels).sample,
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_scalar_timestep_matches_reference(tmp_path):
    ref = reference_model(DDPM)
    ref.save_pretrained(tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path)
    sample, _, _ = inputs(DDPM)
    for t in (37, torch.tensor(37)):
        torch.testing.assert_close(ours(sample, t).sample, ref(sample, t).sample, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_legacy_attention_key_names_load(tmp_path):
    """Checkpoints from before diffusers 0.14 name attention weights query/key/value/proj_attn."""
    ref = reference_model(DDPM)
    ref.save_pretrained(tmp_path)
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, old)
        legacy[key] = value.contiguous()
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    ours = UNet2DModel.from_pretrained(tmp_path)
    sample, timestep, _ = inputs(DDPM)
    torch.testing.assert_close(ours(sample, timestep).sample, ref(sample, timestep).sample, rtol=1e-5, atol=1e-5)


def test_class_label_errors():
    plain = UNet2DModel.from_config(DDPM)
    conditional = UNet2DModel.from_config(CONFIGS["class_conditional"])
    sample, timestep, _ = inputs(DDPM)
    with pytest.raises(ValueError, match="class_labels"):
        conditional(sample, timestep)
    with pytest.raises(ValueError, match="class"):
        plain(sample, timestep, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="time_embedding_type"):
        UNet2DModel.from_config(DDPM, time_embedding_type="nope")
    with pytest.raises(ValueError, match="block type"):
        UNet2DModel.from_config(DDPM, down_block_types=("DownBlock2D", "Nope2D"))
