"""The attention-processor API: attn_processors, set_attn_processor (one or a dict), set_default_attn_processor."""

import pytest
import torch

from diffusekit import AttnProcessor, AttnProcessor2_0, AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from diffusekit.models.attention_processor import ip_mask_weights, ip_masks_per_adapter

UNET = dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
            sample_size=8, layers_per_block=1)


class Recording(AttnProcessor2_0):
    """Runs the default computation, scaled, and records the layers it ran for."""

    def __init__(self, scale: float = 1.0):
        self.scale, self.calls = scale, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        self.calls.append((type(attn).__name__, encoder_hidden_states is not None))
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return tuple(self.scale * o for o in out) if isinstance(out, tuple) else self.scale * out


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).eval()


def _run(model):
    torch.manual_seed(1)
    return model(torch.randn(1, 4, 8, 8), 3, torch.randn(1, 5, 8)).sample


def test_attn_processors_lists_every_attention_layer_with_the_default_processor():
    processors = _unet().attn_processors
    assert len(processors) == 8  # 4 transformers (down 1, mid 1, up 2) x (attn1, attn2)
    assert next(iter(processors)) == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    assert all(type(p) is AttnProcessor2_0 for p in processors.values())


def test_one_processor_runs_for_every_layer_and_the_default_comes_back():
    model = _unet()
    expected = _run(model)
    recording = Recording()
    model.set_attn_processor(recording)
    assert torch.equal(_run(model), expected)
    assert sorted(set(recording.calls)) == [("Attention", False), ("Attention", True)] and len(recording.calls) == 8
    model.set_attn_processor(Recording(scale=0.5))
    assert not torch.allclose(_run(model), expected)
    model.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
    assert torch.equal(_run(model), expected)
    assert not any(key.endswith("processor") for key in model.state_dict())


def test_a_dict_sets_each_layer_and_must_cover_them_all():
    model = _unet()
    keys = list(model.attn_processors)
    chosen = {key: Recording() for key in keys}
    model.set_attn_processor(chosen)
    assert all(model.attn_processors[key] is chosen[key] for key in keys)
    with pytest.raises(ValueError, match="the number of processors 1 does not match the number of attention layers: 8"):
        model.set_attn_processor({keys[0]: AttnProcessor()})
    wrong = dict(chosen)
    wrong["nowhere.processor"] = wrong.pop(keys[0])
    with pytest.raises(ValueError, match="no attention layer 'nowhere.processor'"):
        model.set_attn_processor(wrong)
    with pytest.raises(ValueError, match="must be callable, got int"):
        model.set_attn_processor(3)


def test_vae_and_flux_expose_their_attention_layers():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    assert list(vae.attn_processors) == ["encoder.mid_block.attentions.0.processor",
                                         "decoder.mid_block.attentions.0.processor"]
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(2, 2, 4))
    assert list(flux.attn_processors) == ["transformer_blocks.0.attn.processor",
                                          "single_transformer_blocks.0.attn.processor"]
    inputs = dict(hidden_states=torch.randn(1, 4, 4), encoder_hidden_states=torch.randn(1, 3, 16),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3))
    expected = flux(**inputs).sample
    recording = Recording()
    flux.set_attn_processor(recording)
    assert torch.equal(flux(**inputs).sample, expected)
    assert recording.calls == [("FluxAttention", True), ("FluxAttention", False)]


class Classic:
    """A processor written against the reference's Attention helpers; it names no ``temb`` / ``**kwargs``."""

    def __init__(self):
        self.numbers = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, number=None):
        batch, length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = (attn.head_to_batch_dim(p(x)) for p, x in
                             ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, attention_mask), value))
        self.numbers.append(number)
        return attn.to_out[1](attn.to_out[0](out))


def test_a_classic_processor_gets_only_its_keywords_and_matches_the_default(caplog):
    model = _unet()
    torch.manual_seed(1)
    inputs = (torch.randn(1, 4, 8, 8), 3, torch.randn(1, 5, 8))
    expected = model(*inputs).sample
    classic = Classic()
    model.set_attn_processor(classic)
    with caplog.at_level("WARNING", logger="diffusekit.models.attention_processor"):
        out = model(*inputs, cross_attention_kwargs={"number": 7, "other": 1}).sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert classic.numbers == [7] * 8
    assert "cross_attention_kwargs ['other'] are not expected by Classic and will be ignored." in caplog.text


def test_classic_helpers_fold_heads_and_repeat_masks():
    attn = _unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1  # 2 heads of 4
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    folded = attn.head_to_batch_dim(x)
    assert folded.shape == (4, 3, 4) and torch.equal(folded[1], x[0, :, 4:])
    assert attn.head_to_batch_dim(x, out_dim=4).shape == (2, 2, 3, 4)
    assert torch.equal(attn.batch_to_head_dim(folded), x)
    mask = torch.tensor([[[0.0, -1.0, 0.0]], [[0.0, 0.0, -1.0]]])
    assert torch.equal(attn.prepare_attention_mask(mask, 3, 2)[2:], mask[1:].expand(2, 1, 3))
    assert attn.prepare_attention_mask(mask, 3, 2, out_dim=4).shape == (2, 2, 1, 3)
    assert attn.prepare_attention_mask(mask[:, :, :2], 3, 2).shape == (4, 1, 5)  # padded by target_length
    assert attn.prepare_attention_mask(None, 3, 2) is None
    probs = attn.get_attention_scores(folded, folded)
    torch.testing.assert_close(probs, (folded @ folded.transpose(1, 2) * attn.scale).softmax(-1))


def test_ip_mask_weights_follow_the_query_grid():
    mask = torch.zeros(1, 8, 8)
    mask[..., :4] = 1
    weights = ip_mask_weights(mask, batch=2, num_queries=16)
    assert weights.shape == (2, 16, 1) and torch.equal(weights[0], weights[1])
    grid = weights[0, :, 0].view(4, 4)
    assert (grid[:, :2] > 0.9).all() and (grid[:, 2:] < 0.1).all()
    with pytest.warns(UserWarning, match="aspect ratio"):  # 10 queries: a 4 x 2 grid, padded with zeros
        padded = ip_mask_weights(torch.ones(1, 8, 8), batch=1, num_queries=10)
    assert padded.shape == (1, 10, 1) and torch.equal(padded[0, 8:, 0], torch.zeros(2))


def test_ip_adapter_masks_are_checked_per_adapter():
    tokens = [torch.zeros(1, 2, 4, 8)]
    assert ip_masks_per_adapter(None, tokens) == [None]
    one_image = [torch.zeros(1, 1, 4, 8)]
    assert ip_masks_per_adapter(torch.ones(1, 1, 4, 4), one_image)[0].shape == (1, 1, 4, 4)  # (adapters, 1, H, W)
    with pytest.raises(ValueError, match="2 masks for 1 loaded IP-Adapters"):
        ip_masks_per_adapter([None, None], tokens)
    with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\] must be a tensor \(1, images, height, width\)"):
        ip_masks_per_adapter([torch.ones(4, 4)], tokens)
    with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\] has 1 masks but the adapter has 2 images"):
        ip_masks_per_adapter([torch.ones(1, 1, 4, 4)], tokens)
