"""Model-level adapters against the reference: add (peft LoraConfig), set with weights, disable, fuse,
unload, save_lora_adapter and load_lora_adapter, on a tiny UNet2DConditionModel with the same weights."""

import diffusers
import pytest
import torch

import diffusekit
from sd_components import UNET_CONFIG

peft = pytest.importorskip("peft")

TOL = 1e-5
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**UNET_CONFIG).save_pretrained(folder)
    return folder


def _config(alpha: int = 8) -> "peft.LoraConfig":
    return peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture()
def unets(unet_folder):
    """(ours, reference), each with adapters 'a' and 'b' holding the same tensors."""
    ours = diffusekit.UNet2DConditionModel.from_pretrained(unet_folder)
    ref = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    for name, alpha in (("a", 8), ("b", 4)):
        ref.add_adapter(_config(alpha), adapter_name=name)
        ours.add_adapter(_config(alpha), adapter_name=name)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(1, 4, 16, 16, generator=generator), timestep=10,
                encoder_hidden_states=torch.randn(1, 5, 32, generator=generator))


@torch.no_grad()
def _out(model, **kwargs):
    return model(**_inputs(), **kwargs).sample


def _same(ours, ref, **kwargs):
    diff = (_out(ours, **kwargs) - _out(ref, **kwargs)).abs().max().item()
    assert diff <= TOL, diff


def test_added_adapters_use_peft_layers_and_match(unets):
    ours, ref = unets
    tuners = peft.tuners.tuners_utils.BaseTunerLayer
    assert sum(isinstance(m, tuners) for m in ours.modules()) == sum(isinstance(m, tuners) for m in ref.modules()) > 0
    assert ours.active_adapters() == ref.active_adapters() == ["b"]
    assert sorted(ours.peft_config) == ["a", "b"]
    _same(ours, ref)


def test_set_adapters_with_weights_scale_and_disable_match(unets, unet_folder):
    ours, ref = unets
    for model in unets:
        model.set_adapters(["a", "b"], weights=[0.5, 1.5])
    _same(ours, ref)
    _same(ours, ref, cross_attention_kwargs={"scale": 0.3})
    for model in unets:
        model.set_adapter("a")
    _same(ours, ref)
    base = diffusekit.UNet2DConditionModel.from_pretrained(unet_folder)
    for model in unets:
        model.disable_adapters()
    _same(ours, ref)
    assert torch.equal(_out(ours), _out(base))
    for model in unets:
        model.enable_adapters()
    _same(ours, ref)


def test_fuse_unfuse_unload_and_delete_match(unets):
    ours, ref = unets
    before = _out(ours)
    for model in unets:
        model.fuse_lora(lora_scale=0.7)
    _same(ours, ref)
    for model in unets:
        model.unfuse_lora()
    _same(ours, ref)
    assert (_out(ours) - before).abs().max() > 1e-3  # the reference keeps the fuse scale after unfusing
    for model in unets:
        model.delete_adapters("b")
        model.set_adapter("a")
    _same(ours, ref)
    for model in unets:
        model.unload_lora()
    _same(ours, ref)
    assert "peft_config" not in ours.__dict__
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in ours.modules())


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_and_reload_match_the_reference(unets, unet_folder, tmp_path, safe_serialization):
    ours, ref = unets
    ours.save_lora_adapter(tmp_path / "ours", adapter_name="a", safe_serialization=safe_serialization)
    ref.save_lora_adapter(tmp_path / "ref", adapter_name="a", safe_serialization=safe_serialization)
    name = "pytorch_lora_weights." + ("safetensors" if safe_serialization else "bin")
    saved = diffusekit.weights.load_file(tmp_path / "ours" / name)
    expected = diffusekit.weights.load_file(tmp_path / "ref" / name)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)

    fresh_ours = diffusekit.UNet2DConditionModel.from_pretrained(unet_folder)
    fresh_ref = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    fresh_ours.load_lora_adapter(tmp_path / "ours", prefix=None, adapter_name="x", weight_name=name)
    fresh_ref.load_lora_adapter(tmp_path / "ref", prefix=None, adapter_name="x", weight_name=name)
    _same(fresh_ours, fresh_ref)
    if safe_serialization:  # the alpha travels in the safetensors metadata only (both libraries)
        ours.set_adapter("a")
        _same(fresh_ours, ours)
    fresh_ours.save_lora_adapter(tmp_path / "again", adapter_name="x")
    resaved = diffusekit.weights.load_file(tmp_path / "again" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resaved[k], expected[k]) for k in expected)


@pytest.mark.parametrize("scales", [{"down": 0.0}, {"mid": [2.0], "up": {"block_0": [1.0, 0.0]}},
                                    {"down": {"block_1": 0.5}, "up": 3.0}])
def test_block_weights_match_the_reference(unets, scales):
    ours, ref = unets
    for model in unets:
        model.set_adapters("a", weights=[scales])
    _same(ours, ref)


def test_block_weights_errors_match_the_reference(unets):
    for bad, message in [({"up": {"block_0": [1.0, 2.0, 3.0]}}, "Expected 2 scales for up.block_0, got 3."),
                         ({"mid": [1.0, 2.0]}, "Expected 1 scales for mid, got 2.")]:
        for model in unets:
            with pytest.raises(ValueError, match=message.replace(".", r"\.")):
                model.set_adapters("a", weights=[bad])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_file_saved_from_peft_reloads_as_in_the_reference(unet_folder, tmp_path, use_dora):
    """Both libraries load the reference's save of a peft adapter back as peft layers with the same config."""
    saver = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    torch.manual_seed(0)
    saver.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                      use_dora=use_dora), adapter_name="a")
    saver.save_lora_adapter(tmp_path, adapter_name="a")
    ours = diffusekit.UNet2DConditionModel.from_pretrained(unet_folder)
    ref = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    for model in (ours, ref):
        model.load_lora_adapter(tmp_path, prefix=None, adapter_name="x", use_safetensors=True)
    assert ours.peft_config["x"].to_dict() == ref.peft_config["x"].to_dict()
    state = peft.utils.get_peft_model_state_dict
    assert state(ours, adapter_name="x").keys() == state(ref, adapter_name="x").keys()
    _same(ours, ref)
    _same(ours, ref, cross_attention_kwargs={"scale": 0.5})
