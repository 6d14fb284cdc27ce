"""Parity of UNet1DModel with the reference: Dance Diffusion and RL-planner configs."""

import pytest
import torch
from diffusers import UNet1DModel as RefUNet1DModel

from diffusekit.models.unet_1d import UNet1DModel

DANCE = dict(
    block_out_channels=(32, 32, 64), extra_in_channels=16, time_embedding_dim=16, sample_size=64,
    sample_rate=16_000, in_channels=2, out_channels=2, flip_sin_to_cos=True, use_timestep_embedding=False,
    time_embedding_type="fourier", mid_block_type="UNetMidBlock1D",
    down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
    up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
)
RL_PLANNER = dict(
    in_channels=4, out_channels=4, sample_size=16, block_out_channels=(8, 16, 16, 32),
    down_block_types=("DownResnetBlock1D",) * 4, up_block_types=("UpResnetBlock1D",) * 3,
    mid_block_type="MidResTemporalBlock1D", out_block_type="OutConv1DBlock", layers_per_block=1,
    downsample_each_block=False, use_timestep_embedding=True, freq_shift=1.0, flip_sin_to_cos=False,
    time_embedding_type="positional", act_fn="mish",
)
VALUE_FUNCTION = dict(
    in_channels=4, out_channels=4, sample_size=16, block_out_channels=(8, 16, 16, 32),
    down_block_types=("DownResnetBlock1D",) * 4, up_block_types=(), mid_block_type="ValueFunctionMidBlock1D",
    out_block_type="ValueFunction", layers_per_block=1, downsample_each_block=True, use_timestep_embedding=True,
    freq_shift=1.0, flip_sin_to_cos=False, time_embedding_type="positional", act_fn="mish",
)


def _pair(config, folder):
    torch.manual_seed(0)
    ref = RefUNet1DModel(**config).eval()
    ref.save_pretrained(folder)
    return ref, UNet1DModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def dance_pair(tmp_path_factory):
    return _pair(DANCE, tmp_path_factory.mktemp("dance"))


@pytest.mark.parametrize("timestep", [torch.tensor([10.0, 500.0]), 3, torch.tensor(0.25)])
def test_dance_diffusion_forward_matches(dance_pair, timestep):
    ref, ours = dance_pair
    torch.manual_seed(1)
    sample = torch.randn(2, 2, 64)
    with torch.no_grad():
        expected = ref(sample, timestep).sample
        got = ours(sample, timestep).sample
    assert got.shape == (2, 2, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours(sample, timestep, return_dict=False)[0], got)


@pytest.mark.parametrize("config", [RL_PLANNER, VALUE_FUNCTION], ids=["planner", "value_function"])
def test_rl_configs_match(tmp_path, config):
    ref, ours = _pair(config, tmp_path)
    torch.manual_seed(2)
    sample = torch.randn(2, 4, 16)
    timestep = torch.tensor([7, 90])
    with torch.no_grad():
        expected = ref(sample, timestep).sample
        got = ours(sample, timestep).sample
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_our_save_loads_in_reference(tmp_path):
    torch.manual_seed(0)
    ours = UNet1DModel(**DANCE).eval()
    ours.save_pretrained(tmp_path)
    ref = RefUNet1DModel.from_pretrained(tmp_path).eval()
    assert set(ref.state_dict()) == set(ours.state_dict())
    sample = torch.randn(1, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(sample, 5).sample, ref(sample, 5).sample, atol=1e-5, rtol=1e-5)


def test_bad_block_type_names_argument():
    with pytest.raises(ValueError, match="down_block_types"):
        UNet1DModel(**{**DANCE, "down_block_types": ("DownBlock1DNoSkip", "Nope", "AttnDownBlock1D")})
