"""The attention-processor API: attn_processors, set_attn_processor (one or a dict), set_default_attn_processor."""

import pytest
import torch

from diffusekit import AttnProcessor, AttnProcessor2_0, AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

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
