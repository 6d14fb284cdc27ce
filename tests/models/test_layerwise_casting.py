"""enable_layerwise_casting: weights stored small, each layer computing in the compute dtype, per call."""

import threading

import pytest
import torch
from torch import nn

from diffusekit import UNet2DConditionModel
from diffusekit.models.layerwise_casting import enable_layerwise_casting

UNET = dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
            sample_size=8, layers_per_block=1)


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), 3, torch.randn(1, 5, 8, generator=g)


@torch.no_grad()
def test_storage_dtype_with_float32_compute_matches_rounded_weights():
    model = _unet()
    rounded = _unet()
    for name, module in rounded.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and "norm" not in name:
            for p in module.parameters(recurse=False):
                p.copy_(p.to(torch.bfloat16).float())
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert model.conv_in.weight.dtype == torch.bfloat16 and model.time_embedding.linear_1.weight.dtype == torch.bfloat16
    assert model.conv_norm_out.weight.dtype == torch.float32  # "norm" is skipped
    out = model(*_inputs()).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rounded(*_inputs()).sample, rtol=0, atol=1e-6)
    assert not any("weight" in k and v.dtype == torch.float8_e4m3fn for k, v in model.state_dict().items())


@torch.no_grad()
def test_float8_storage_runs_and_threads_do_not_share_casts():
    model = _unet()
    model.enable_layerwise_casting(skip_modules_pattern=("conv_out",), skip_modules_classes=(nn.Linear,))
    assert model.conv_in.weight.dtype == torch.float8_e4m3fn and model.conv_out.weight.dtype == torch.float32
    assert model.time_embedding.linear_1.weight.dtype == torch.float32
    alone = model(*_inputs()).sample
    results = []
    threads = [threading.Thread(target=lambda: results.append(model(*_inputs()).sample)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(torch.equal(r, alone) for r in results)
    assert model.conv_in.weight.dtype == torch.float8_e4m3fn  # nothing written back


def test_transposed_convolutions_and_lora_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), nn.Linear(3, 3))
    x = torch.randn(1, 2, 4, 4)
    expected = model[0](x, output_size=(8, 8))
    enable_layerwise_casting(model, torch.bfloat16, torch.float32)
    assert model[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(model[0](x, output_size=(8, 8)), expected, rtol=0, atol=5e-2)
    model[1].lora_active = ("a",)
    with pytest.raises(ValueError, match="load LoRAs before enable_layerwise_casting"):
        model[1](torch.randn(1, 3))
