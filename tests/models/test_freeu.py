"""FreeU (models/freeu.py): the Fourier filter, and the factors acting only on up levels 0 and 1."""

import torch

from diffusekit import UNet2DConditionModel
from diffusekit.models.freeu import apply_freeu, fourier_filter

UNET = dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
            sample_size=8, layers_per_block=1)


def test_fourier_filter_scales_only_the_lowest_frequencies():
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fourier_filter(x, threshold=1, scale=1.0), x, rtol=0, atol=1e-6)
    constant = torch.full((1, 1, 8, 8), 2.0)
    torch.testing.assert_close(fourier_filter(constant, threshold=1, scale=0.5), constant * 0.5)  # DC only
    half = fourier_filter(x.to(torch.bfloat16), threshold=1, scale=0.5)
    assert half.dtype == torch.bfloat16


def test_factors_act_on_levels_0_and_1_and_never_write_inputs():
    block = torch.nn.Module()
    block.s1, block.s2, block.b1, block.b2 = 0.5, 0.25, 2.0, 3.0
    hidden, skip = torch.ones(1, 4, 4, 4), torch.ones(1, 2, 4, 4)
    for level, factor in ((0, 2.0), (1, 3.0)):
        block.resolution_idx = level
        out, filtered = apply_freeu(block, hidden, skip)
        assert torch.equal(out[:, :2], hidden[:, :2] * factor) and torch.equal(out[:, 2:], hidden[:, 2:])
        assert not torch.equal(filtered, skip)
    assert torch.equal(hidden, torch.ones(1, 4, 4, 4))
    block.resolution_idx = 2
    assert apply_freeu(block, hidden, skip) == (hidden, skip)
    block.resolution_idx, block.s1 = 0, None  # one factor unset: off
    assert apply_freeu(block, hidden, skip) == (hidden, skip)


@torch.no_grad()
def test_enable_and_disable_freeu_on_the_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), 3, torch.randn(1, 5, 8, generator=g))
    plain = unet(*args).sample
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert [b.b1 for b in unet.up_blocks] == [1.2, 1.2]
    assert not torch.allclose(unet(*args).sample, plain, atol=1e-5)
    unet.disable_freeu()
    assert torch.equal(unet(*args).sample, plain)
