"""FLUX control LoRAs: widening ``x_embedder``, zero-padding narrow LoRAs, replaced norm weights, and
what loading and unloading undo (the reference comparison is in tests/parity/test_flux_control.py)."""

import pytest
import torch

from diffusekit import FluxTransformer2DModel
from diffusekit.loaders.lora import LoraLoaderMixin
from diffusekit.weights import WeightsError
from flux_components import TRANSFORMER_CONFIG


class Holder(LoraLoaderMixin):
    """The LoRA mixin needs only the component attributes."""

    def __init__(self, transformer):
        self.transformer = transformer


def _transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def _lora(in_features: int, seed: int = 0, **extra) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"transformer.x_embedder.lora_A.weight": torch.randn(2, in_features, generator=g),
            "transformer.x_embedder.lora_B.weight": torch.randn(32, 2, generator=g), **extra}


def _inputs(in_channels: int):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 32, generator=g), pooled_projections=torch.randn(1, 32, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
                guidance=torch.tensor([3.5]))


def test_widening_keeps_old_inputs_and_reset_restores_the_same_tensor():
    model = _transformer()
    holder = Holder(model)
    original = model.x_embedder.weight
    with torch.no_grad():
        before = model(**_inputs(16)).sample
    holder.load_lora_weights(_lora(32), adapter_name="control")
    assert model.config.in_channels == 32 and model.x_embedder.in_features == 32
    holder.disable_lora()
    wide = _inputs(16)
    wide["hidden_states"] = torch.cat([wide["hidden_states"], torch.randn(1, 4, 16)], dim=2)
    with torch.no_grad():  # zero columns: the extra inputs do nothing without the adapter
        torch.testing.assert_close(model(**wide).sample, before, rtol=0, atol=1e-6)
    holder.unload_lora_weights(reset_to_overwritten_params=True)
    assert model.x_embedder.weight is original and model.config.in_channels == 16
    assert "_widened_layers" not in model.__dict__


def test_narrow_lora_is_padded_and_wide_lora_on_adapted_layer_is_refused():
    model = _transformer()
    holder = Holder(model)
    holder.load_lora_weights(_lora(16), adapter_name="style")
    refused = r"size mismatch for x_embedder\.lora_A\.control\.weight.*already carries LoRA adapters"
    with pytest.raises(RuntimeError, match=refused) as info:  # a ValueError too
        holder.load_lora_weights(_lora(32, seed=1), adapter_name="control")
    assert isinstance(info.value, ValueError)
    assert model.config.in_channels == 16 and model.x_embedder.weight.shape == (32, 16)

    model = _transformer()
    holder = Holder(model)
    holder.load_lora_weights(_lora(32), adapter_name="control")
    holder.load_lora_weights(_lora(8, seed=2), adapter_name="narrow")  # padded to the 32 inputs
    adapter = model.x_embedder.lora_adapters["narrow"]
    assert adapter.down.shape == (2, 32) and not adapter.down[:, 8:].any()
    holder.set_adapters(["control", "narrow"], [1.0, 0.5])
    with torch.no_grad():
        unfused = model(**_inputs(32)).sample
        holder.fuse_lora(adapter_names=["control", "narrow"])
        torch.testing.assert_close(model(**_inputs(32)).sample, unfused, rtol=0, atol=1e-5)


def test_a_failed_load_undoes_its_widening():
    model = _transformer()
    holder = Holder(model)
    original = model.x_embedder.weight
    bad = _lora(32, **{"transformer.no_such_layer.lora_A.weight": torch.zeros(2, 4),
                       "transformer.no_such_layer.lora_B.weight": torch.zeros(4, 2)})
    with pytest.raises(WeightsError, match="no_such_layer"):
        holder.load_lora_weights(bad)
    assert model.x_embedder.weight is original and model.config.in_channels == 16
    assert holder.get_list_adapters() == {}


def test_norm_weights_are_replaced_and_restored():
    model = _transformer()
    holder = Holder(model)
    names = ["transformer_blocks.0.attn.norm_added_q", "single_transformer_blocks.0.attn.norm_k"]
    originals = [model.get_submodule(n).weight for n in names]
    state = {f"transformer.{n}.weight": torch.full((16,), 2.0) for n in names}
    holder.load_lora_weights(state)  # norms only: a valid control LoRA
    assert all(torch.equal(model.get_submodule(n).weight, torch.full((16,), 2.0)) for n in names)
    holder.unload_lora_weights()
    assert all(model.get_submodule(n).weight is w for n, w in zip(names, originals))
    holder.load_lora_weights(state)
    model.to(torch.float64)  # moved after loading: the originals come back in the model's new dtype
    holder.unload_lora_weights()
    assert all(torch.equal(model.get_submodule(n).weight, w.double()) for n, w in zip(names, originals))
    with pytest.raises(ValueError, match=r"lora\.safetensors|LoRA state dict.*norm_k.weight: shape \(8,\)"):
        holder.load_lora_weights({"transformer.single_transformer_blocks.0.attn.norm_k.weight": torch.ones(8)})


def _bfl_control_lora() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(a BFL-layout control LoRA for the tiny transformer, the same LoRA in the diffusers layout)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    bfl = {"img_in.lora_A.weight": rand(2, 32), "img_in.lora_B.weight": rand(32, 2), "img_in.lora_B.bias": rand(32),
           "double_blocks.0.img_attn.qkv.lora_A.weight": rand(2, 32),
           "double_blocks.0.img_attn.qkv.lora_B.weight": rand(96, 2),
           "double_blocks.0.img_attn.qkv.lora_B.bias": rand(96),
           "single_blocks.0.linear1.lora_A.weight": rand(2, 32), "single_blocks.0.linear1.lora_B.weight": rand(224, 2)}
    norms = {"double_blocks.0.img_attn.norm.query_norm.scale": "transformer_blocks.0.attn.norm_q",
             "double_blocks.0.txt_attn.norm.key_norm.scale": "transformer_blocks.0.attn.norm_added_k",
             "single_blocks.0.norm.key_norm.scale": "single_transformer_blocks.0.attn.norm_k"}
    bfl.update({key: 1 + rand(16) for key in norms})
    ours = {"transformer.x_embedder.lora_A.weight": bfl["img_in.lora_A.weight"],
            "transformer.x_embedder.lora_B.weight": bfl["img_in.lora_B.weight"],
            "transformer.x_embedder.lora_B.bias": bfl["img_in.lora_B.bias"]}
    for prefix, source, targets, sizes in (
            ("transformer_blocks.0.attn.", "double_blocks.0.img_attn.qkv", ("to_q", "to_k", "to_v"), (32,) * 3),
            ("single_transformer_blocks.0.", "single_blocks.0.linear1",
             ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (32, 32, 32, 128))):
        ups = torch.split(bfl[f"{source}.lora_B.weight"], sizes)
        biases = torch.split(bfl[f"{source}.lora_B.bias"], sizes) if f"{source}.lora_B.bias" in bfl else [None] * 4
        for target, up, bias in zip(targets, ups, biases):
            ours[f"transformer.{prefix}{target}.lora_A.weight"] = bfl[f"{source}.lora_A.weight"]
            ours[f"transformer.{prefix}{target}.lora_B.weight"] = up
            if bias is not None:
                ours[f"transformer.{prefix}{target}.lora_B.bias"] = bias
    ours.update({f"transformer.{name}.weight": bfl[key] for key, name in norms.items()})
    return bfl, ours


def test_bfl_control_lora_equals_its_diffusers_layout():
    bfl, same = _bfl_control_lora()
    outputs = []
    for state in (bfl, same):
        model = _transformer()
        Holder(model).load_lora_weights(state)
        assert model.config.in_channels == 32
        assert torch.equal(model.transformer_blocks[0].attn.norm_added_k.weight,
                           bfl["double_blocks.0.txt_attn.norm.key_norm.scale"])
        with torch.no_grad():
            outputs.append(model(**_inputs(32)).sample)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    model = _transformer()
    with pytest.raises(ValueError, match="img_attn.qkv.lora_A.weight: the up matrix has 95 rows"):
        Holder(model).load_lora_weights({**bfl, "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(95, 2)})
    assert model.config.in_channels == 16
