"""ControlNetModel / MultiControlNetModel without the reference: layout, from_unet, scaling, saving,
and the shared pipeline helpers of controlnet_common."""

import pytest
import torch

from diffusekit import ControlNetModel, MultiControlNetModel, UNet2DConditionModel
from diffusekit.models.controlnet import ControlNetOutput
from diffusekit.pipelines import controlnet_common as cc

UNET = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, cross_attention_dim=8, norm_num_groups=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=2)
NET = dict(block_out_channels=(4, 8), layers_per_block=1, cross_attention_dim=8, norm_num_groups=2,
           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=2,
           conditioning_embedding_out_channels=(4, 8))


def _net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = ControlNetModel(**{**NET, **overrides})
    with torch.no_grad():  # the zero convs start at zero: give every weight a value
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(10),
            torch.randn(batch, 3, 8, generator=g), torch.rand(batch, 3, 16, 16, generator=g))


def test_layout_names_and_residual_shapes():
    net = _net()
    keys = list(net.state_dict())
    assert keys[0] == "conv_in.weight"
    assert "controlnet_cond_embedding.conv_out.weight" in keys and "controlnet_mid_block.bias" in keys
    assert sum(k.startswith("controlnet_down_blocks.") and k.endswith(".weight") for k in keys) == 4
    out = net(*_inputs())
    assert isinstance(out, ControlNetOutput)
    assert [tuple(r.shape) for r in out.down_block_res_samples] == [(2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 4, 4),
                                                                   (2, 8, 4, 4)]
    assert tuple(out.mid_block_res_sample.shape) == (2, 8, 4, 4)


def test_fresh_net_gives_zero_residuals():
    torch.manual_seed(0)
    down, mid = ControlNetModel(**NET)(*_inputs(), return_dict=False)
    assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0


def test_scale_guess_mode_pooling_and_channel_order():
    net, inputs = _net(), _inputs()
    down, mid = net(*inputs, return_dict=False)
    half_down, half_mid = net(*inputs, conditioning_scale=0.5, return_dict=False)
    torch.testing.assert_close(half_mid, mid * 0.5)
    guess_down, guess_mid = net(*inputs, guess_mode=True, return_dict=False)
    ramp = torch.logspace(-1, 0, len(down) + 1)
    for plain, guessed, factor in zip(down, guess_down, ramp):
        torch.testing.assert_close(guessed, plain * factor)
    torch.testing.assert_close(guess_mid, mid)
    pooled = _net(global_pool_conditions=True)
    pooled_down, _ = pooled(*inputs, guess_mode=True, return_dict=False)
    assert all(r.shape[-2:] == (1, 1) for r in pooled_down)
    bgr = _net(controlnet_conditioning_channel_order="bgr")
    flipped = inputs[:3] + (inputs[3].flip(1),)
    torch.testing.assert_close(bgr(*flipped, return_dict=False)[1], net(*inputs, return_dict=False)[1])


def test_from_unet_copies_the_down_path():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    assert list(net.config.block_out_channels) == [4, 8]
    for name, tensor in unet.down_blocks.state_dict().items():
        torch.testing.assert_close(net.down_blocks.state_dict()[name], tensor)
    torch.testing.assert_close(net.conv_in.weight, unet.conv_in.weight)
    fresh = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8), load_weights_from_unet=False)
    assert not torch.equal(fresh.conv_in.weight, unet.conv_in.weight)


def test_save_load_round_trip(tmp_path):
    net = _net()
    net.save_pretrained(tmp_path / "cn")
    loaded = ControlNetModel.from_pretrained(tmp_path / "cn")
    torch.testing.assert_close(loaded(*_inputs(), return_dict=False)[1], net(*_inputs(), return_dict=False)[1])


def test_multi_sums_nets_and_saves_one_folder_per_net(tmp_path):
    a, b = _net(0), _net(1)
    x, t, e, image = _inputs()
    multi = MultiControlNetModel([a, b])
    down, mid = multi(x, t, e, [image, image.flip(-1)], [0.5, 2.0])
    a_down, a_mid = a(x, t, e, image, 0.5, return_dict=False)
    b_down, b_mid = b(x, t, e, image.flip(-1), 2.0, return_dict=False)
    torch.testing.assert_close(mid, a_mid + b_mid)
    torch.testing.assert_close(down[2], a_down[2] + b_down[2])
    with pytest.raises(ValueError, match="2 nets but got 1 conditioning images"):
        multi(x, t, e, [image], [1.0, 1.0])
    multi.save_pretrained(tmp_path / "controlnet")
    assert (tmp_path / "controlnet" / "config.json").is_file() and (tmp_path / "controlnet_1" / "config.json").is_file()
    loaded = MultiControlNetModel.from_pretrained(tmp_path / "controlnet")
    assert len(loaded.nets) == 2
    torch.testing.assert_close(loaded(x, t, e, [image, image], [1.0, 1.0])[1], multi(x, t, e, [image, image],
                                                                                        [1.0, 1.0])[1])
    with pytest.raises(ValueError, match="no ControlNet folder"):
        MultiControlNetModel.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("overrides, message", [
    (dict(mid_block_type="Unknown"), "mid_block_type 'Unknown'"),
    (dict(controlnet_conditioning_channel_order="rbg"), "controlnet_conditioning_channel_order 'rbg'"),
    (dict(addition_embed_type="text"), "addition_embed_type 'text'"),
    (dict(addition_embed_type="text_time"), "needs addition_time_embed_dim"),
    (dict(block_out_channels=(4, 8, 8)), "does not match down_block_types"),
    (dict(layers_per_block=(1, 1)), "layers_per_block must be an int"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ControlNetModel(**{**NET, **overrides})


def test_keep_scales_and_windows():
    assert cc.controlnet_keep(4, [0.0, 0.5], [0.5, 1.0]) == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert cc.guidance_windows(0.1, [0.5, 0.9], 2) == ([0.1, 0.1], [0.5, 0.9])
    assert cc.conditioning_scales(0.5, 3) == [0.5, 0.5, 0.5]
    assert cc.conditioning_scales([0.3], 1) == [0.3]
    with pytest.raises(ValueError, match="list of 1 numbers"):
        cc.conditioning_scales([0.3, 0.7], 1)
    with pytest.raises(ValueError, match="list of 2 numbers"):
        cc.conditioning_scales([1.0, 1.0, 1.0], 2)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        cc.guidance_windows(0.6, 0.4, 1)
    with pytest.raises(ValueError, match="there are 2 ControlNets"):
        cc.guidance_windows([0.0], [1.0], 2)


def test_prepare_control_image_batches_and_guidance():
    image = torch.rand(1, 3, 20, 20)
    out = cc.prepare_control_image(image, 16, 16, batch_size=3, num_images_per_prompt=3, device="cpu",
                                   dtype=torch.float32, do_classifier_free_guidance=True)
    assert tuple(out.shape) == (6, 3, 16, 16) and out.min() >= 0
    guess = cc.prepare_control_image(image, None, None, 2, 1, "cpu", torch.float32, True, guess_mode=True)
    assert tuple(guess.shape) == (2, 3, 16, 16)
    pair = cc.prepare_control_image(torch.rand(2, 3, 8, 8), None, None, 4, 2, "cpu", torch.float32, prompt_batch=2)
    assert tuple(pair.shape) == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="holds 3 images but there are 2 prompts"):
        cc.prepare_control_image(torch.rand(3, 3, 8, 8), None, None, 2, 1, "cpu", torch.float32, prompt_batch=2)
    multi = MultiControlNetModel([_net(0), _net(1)])
    with pytest.raises(ValueError, match="list of 2 images"):
        cc.prepare_control_images(multi, image, width=None, height=None, batch_size=1, num_images_per_prompt=1,
                                  device="cpu")
    regrouped = cc.prepare_control_images(multi, [[image, image * 0], [image, image * 0]], per_prompt_lists=True,
                                          width=None, height=None, batch_size=2, num_images_per_prompt=1,
                                          device="cpu", prompt_batch=2)
    assert len(regrouped) == 2 and torch.count_nonzero(regrouped[1]) == 0


def test_call_residuals_in_guess_mode_zero_the_unconditional_half():
    from diffusekit import DDIMScheduler

    net = _net()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(2)
    x, t, e, image = _inputs(batch=1)
    call = cc.prepare_controlnet_call(net, image, 2, 0.5, True, 0.0, 1.0)
    residuals = call.residuals(scheduler, 0, x, t, torch.cat([e, e]), guided=True)
    mid = residuals[cc.MID_RESIDUAL]
    assert mid.shape[0] == 2 and torch.count_nonzero(mid[0]) == 0
    torch.testing.assert_close(mid[1:], net(x, t, e, image, 0.5, guess_mode=True, return_dict=False)[1])
    late = cc.prepare_controlnet_call(net, torch.cat([image] * 2), 2, 1.0, False, 0.5, 1.0)
    assert late.step_scale(0) == 0.0 and late.step_scale(1) == 1.0


def test_call_residuals_pass_the_conditional_half_of_added_cond_kwargs():
    from diffusekit import DDIMScheduler

    net = _net(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=14)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(2)
    x, t, e, image = _inputs(batch=1)
    g = torch.Generator().manual_seed(3)
    added = dict(text_embeds=torch.randn(2, 6, generator=g), time_ids=torch.rand(2, 2, generator=g))
    call = cc.prepare_controlnet_call(net, image, 2, 1.0, True, 0.0, 1.0)
    mid = call.residuals(scheduler, 0, x, t, torch.cat([-e, e]), guided=True, added_cond_kwargs=added)[cc.MID_RESIDUAL]
    half = {k: v[1:] for k, v in added.items()}
    torch.testing.assert_close(mid[1:], net(x, t, e, image, guess_mode=True, added_cond_kwargs=half,
                                            return_dict=False)[1])
    full = cc.prepare_controlnet_call(net, torch.cat([image] * 2), 2, 1.0, False, 0.0, 1.0)
    both = full.residuals(scheduler, 0, x, t, torch.cat([-e, e]), guided=True, added_cond_kwargs=added)
    assert both[cc.MID_RESIDUAL].shape[0] == 2 and torch.count_nonzero(both[cc.MID_RESIDUAL][0]) > 0


def test_gradient_checkpointing_keeps_gradients():
    x, t, e, image = _inputs()
    grads = []
    for checkpointing in (False, True):
        net = _net().train()
        if checkpointing:
            net.enable_gradient_checkpointing()
        down, mid = net(x, t, e, image, return_dict=False)
        (mid.square().mean() + sum(d.mean() for d in down)).backward()
        grads.append(net.down_blocks[1].attentions[0].proj_in.weight.grad)
    assert net.is_gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0])
