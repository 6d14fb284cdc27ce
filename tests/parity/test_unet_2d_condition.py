"""UNet2DConditionModel against the reference: tiny SD 1.x / 2.x / XL-like configs and forward options."""

import time

import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet

from diffusekit.models.unet_2d_condition import UNet2DConditionModel

SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
           norm_num_groups=8, cross_attention_dim=24, attention_head_dim=(2, 4),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD2 = dict(SD1, use_linear_projection=True, upcast_attention=True, cross_attention_dim=32, attention_head_dim=(4, 8))
SDXL = dict(SD1, use_linear_projection=True, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
CONFIGS = {
    "sd1": SD1,
    "sd2": SD2,
    "sdxl": SDXL,
    "three_blocks_int_heads": dict(SD1, block_out_channels=(16, 32, 32), attention_head_dim=4, layers_per_block=(1, 2, 1),
                                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "class_and_extras": dict(SD1, num_class_embeds=5, time_cond_proj_dim=6, time_embedding_act_fn="silu",
                             timestep_post_act="silu", conv_in_kernel=1, conv_out_kernel=1,
                             only_cross_attention=(True, False), resnet_time_scale_shift="scale_shift",
                             encoder_hid_dim=12, mid_block_type="UNetMidBlock2D"),
    "class_projection_concat": dict(SD1, class_embed_type="projection", projection_class_embeddings_input_dim=10,
                                    class_embeddings_concat=True, flip_sin_to_cos=False, freq_shift=1),
    "fourier_time_no_mid": dict(SD1, time_embedding_type="fourier", mid_block_type=None, center_input_sample=True),
}


def reference_model(config: dict) -> RefUNet:
    torch.manual_seed(0)
    model = RefUNet(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(config: dict, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    kwargs = dict(sample=torch.randn(2, 4, size, size, generator=g), timestep=torch.tensor([3.0, 700.0]),
                  encoder_hidden_states=torch.randn(2, 5, width, generator=g))
    if config.get("time_embedding_type") == "fourier":
        kwargs["timestep"] = torch.tensor([0.3, 2.0])
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, generator=g),
                                       "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([0, 4])
    if config.get("class_embed_type") == "projection":
        kwargs["class_labels"] = torch.randn(2, 10, generator=g)
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(2, config["time_cond_proj_dim"], generator=g)
    return kwargs


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    ref = reference_model(SD1)
    ref.save_pretrained(folder)
    return ref, UNet2DConditionModel.from_pretrained(folder)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_checkpoint_loads_and_matches(name, tmp_path):
    config = CONFIGS[name]
    ref = reference_model(config)
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    kwargs = inputs(config)
    got = ours(**kwargs).sample
    close(got, ref(**kwargs).sample)
    assert got.shape == kwargs["sample"].shape


@torch.no_grad()
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_our_save_loads_in_reference(name, tmp_path):
    config = CONFIGS[name]
    ours = UNet2DConditionModel.from_config(config)
    ours.load_checked_state_dict(dict(reference_model(config).state_dict()))
    ours.save_pretrained(tmp_path)
    reloaded = RefUNet.from_pretrained(tmp_path).eval()
    kwargs = inputs(config)
    close(reloaded(**kwargs).sample, ours(**kwargs).sample)


@torch.no_grad()
def test_masks_residuals_odd_size_and_scalar_timestep(sd1_pair):
    ref, ours = sd1_pair
    kwargs = inputs(SD1, size=9)  # odd size: upsample_size is forwarded to the up blocks
    kwargs["timestep"] = 500
    kwargs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    close(ours(**kwargs).sample, ref(**kwargs).sample)

    kwargs = inputs(SD1)
    g = torch.Generator().manual_seed(2)
    down = [torch.randn(2, 32, 8, 8, generator=g) for _ in range(2)] + [torch.randn(2, 32, 4, 4, generator=g),
                                                                      torch.randn(2, 64, 4, 4, generator=g)]
    mid = torch.randn(2, 64, 4, 4, generator=g)
    extra = dict(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
                 cross_attention_kwargs={"scale": 0.5})
    close(ours(**kwargs, **extra).sample, ref(**kwargs, **extra).sample)
    assert not torch.allclose(ours(**kwargs, **extra).sample, ours(**kwargs).sample)


@torch.no_grad()
def test_attention_slicing_and_fused_projections_keep_outputs(sd1_pair, tmp_path):
    ref, _ = sd1_pair
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    kwargs = inputs(SD1)
    expected = ref(**kwargs).sample
    for size in ("auto", "max", 1, None):
        ours.set_attention_slice(size)
        close(ours(**kwargs).sample, expected)
    with pytest.raises(ValueError, match="slice_size"):
        ours.set_attention_slice(99)
    ours.fuse_qkv_projections()
    close(ours(**kwargs).sample, expected)
    ours.unfuse_qkv_projections()
    close(ours(**kwargs).sample, expected)


def test_config_errors():
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet2DConditionModel.from_config(SD1, num_attention_heads=2)
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionModel.from_config(SD1, attention_head_dim=(2, 4, 8))
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNet2DConditionModel.from_config(SD1, addition_embed_type="image")
    model = UNet2DConditionModel.from_config(SDXL)
    kwargs = inputs(SDXL)
    kwargs["added_cond_kwargs"] = {"text_embeds": kwargs["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(ValueError, match="time_ids"):
        model(**kwargs)


SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd15_unet_matches_reference(all_threads):
    """Full SD 1.5 config with random weights: one 64x64 latent forward, float32, 1e-4 relative."""
    torch.manual_seed(0)
    ref = RefUNet(**SD15).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(SD15)
    ours.load_checked_state_dict(dict(ref.state_dict()))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 64, 64, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    start = time.perf_counter()
    got = ours(sample, 981, context).sample
    ours_seconds = time.perf_counter() - start
    expected = ref(sample, 981, context).sample
    scale = expected.abs().max()
    assert ((got - expected).abs().max() / scale).item() < 1e-4
    print(f"full-size SD1.5 UNet forward: ours {ours_seconds:.1f}s")


@torch.no_grad()
@pytest.mark.parametrize("size", [8, 6])  # 6: not a power of two, filtered in float32
def test_freeu_matches_reference(sd1_pair, size):
    ref, ours = sd1_pair
    kwargs = inputs(SD1, size=size)
    plain = ours(**kwargs).sample
    for model in (ref, ours):
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        out = ours(**kwargs).sample
        close(out, ref(**kwargs).sample)
    finally:
        for model in (ref, ours):
            model.disable_freeu()
    assert not torch.allclose(out, plain, atol=1e-4)
    assert torch.equal(ours(**kwargs).sample, plain)
    assert all(block.s1 is None and block.b2 is None for block in ours.up_blocks)
