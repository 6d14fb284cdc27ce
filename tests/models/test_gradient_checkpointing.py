import pytest
import torch

from diffusekit import AutoencoderKL, UNet1DModel, UNet2DConditionModel, UNet2DModel, VQModel
from diffusekit.models.modeling import checkpoint_module

from sd_components import UNET_CONFIG, VAE_CONFIG

UNET_2D_CONFIG = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, norm_num_groups=2,
                      attention_head_dim=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _unet_2d():
    return UNet2DModel(**UNET_2D_CONFIG), (torch.randn(2, 3, 8, 8), torch.tensor([3, 500]))


def _unet_2d_condition():
    return UNet2DConditionModel(**UNET_CONFIG), (torch.randn(2, 4, 16, 16), torch.tensor([10, 20]),
                                                 torch.randn(2, 5, 32))


def _vae():
    return AutoencoderKL(**VAE_CONFIG), (torch.randn(1, 3, 16, 16),)


BUILDERS = {"UNet2DModel": _unet_2d, "UNet2DConditionModel": _unet_2d_condition, "AutoencoderKL": _vae}
CHECKPOINTED = {
    "UNet2DModel": {"AttnUpBlock2D", "AttnDownBlock2D", "UNetMidBlock2D", "UpBlock2D", "DownBlock2D"},
    "UNet2DConditionModel": {"CrossAttnUpBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D",
                             "Transformer2DModel", "DownBlock2D"},
    "AutoencoderKL": {"Encoder", "Decoder", "UNetMidBlock2D"},
}


def _loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(*inputs, return_dict=False)[0].square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradients_equal_with_and_without_checkpointing(name):
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    model.train()
    assert not model.is_gradient_checkpointing
    loss, grads = _loss_and_grads(model, inputs)
    calls = []

    def counting(module, *args):
        calls.append(type(module).__name__)
        return checkpoint_module(module, *args)

    model.enable_gradient_checkpointing(counting)
    assert model.is_gradient_checkpointing
    loss_2, grads_2 = _loss_and_grads(model, inputs)
    assert calls, "no block was checkpointed"
    torch.testing.assert_close(loss_2, loss, rtol=0, atol=1e-6)
    assert grads_2.keys() == grads.keys() and len(grads) > 10
    for key, grad in grads.items():
        torch.testing.assert_close(grads_2[key], grad, rtol=1e-5, atol=1e-6, msg=key)
    calls.clear()
    with torch.no_grad():
        model(*inputs)
    assert calls == []  # no checkpoint without gradients
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_reference_blocks_take_the_flag(name):
    model, _ = BUILDERS[name]()
    model.enable_gradient_checkpointing()
    flagged = {type(m).__name__ for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    assert flagged == CHECKPOINTED[name]
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))


def test_models_without_support_refuse():
    vq = VQModel(block_out_channels=(4,), norm_num_groups=2, latent_channels=2)
    with pytest.raises(ValueError, match="VQModel does not support gradient checkpointing"):
        vq.enable_gradient_checkpointing()
    unet_1d = UNet1DModel(block_out_channels=(32, 32), down_block_types=("DownBlock1DNoSkip", "DownBlock1D"),
                          up_block_types=("UpBlock1D", "UpBlock1DNoSkip"), mid_block_type="UNetMidBlock1D",
                          sample_size=16, in_channels=2, out_channels=2, extra_in_channels=16)
    unet_1d.disable_gradient_checkpointing()  # a no-op, as in the reference
    assert not unet_1d.is_gradient_checkpointing
