"""Model-level adapter API (peft LoraConfig and LoRA files) and the pipeline-level API over both kinds of layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffusekit.loaders import adapter_layers as adapters
from diffusekit.loaders import lora_layers as layers
from diffusekit.loaders.lora import LoraLoaderMixin
from diffusekit.weights import check_safetensors_header, load_file
from lora_files import Tiny

peft = pytest.importorskip("peft")


class Pipe(LoraLoaderMixin):
    _lora_loadable_modules = ["unet", "text_encoder"]

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.unet, self.text_encoder = Tiny(), Tiny()


def _config(alpha: int = 2) -> peft.LoraConfig:
    return peft.LoraConfig(r=2, lora_alpha=alpha, target_modules=["to_q", "to_k"], init_lora_weights=False)


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def _model_with(*names: str) -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    for name in names:
        model.add_adapter(_config(), adapter_name=name)
    return model


def test_add_adapter_injects_peft_layers_and_records_the_config():
    model = _model_with("a")
    assert isinstance(model.to_q, peft.tuners.tuners_utils.BaseTunerLayer)
    assert list(model.peft_config) == ["a"] and model.active_adapters() == ["a"]


def test_add_adapter_errors_name_the_problem():
    model = _model_with("a")
    with pytest.raises(ValueError, match="should be an instance of PeftConfig, got dict"):
        model.add_adapter({"r": 2})
    with pytest.raises(ValueError, match="Adapter with name a already exists"):
        model.add_adapter(_config(), adapter_name="a")
    with pytest.raises(ValueError, match="could not be found: nope"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="Length of adapter names 1 is not equal to the length of their weights 2"):
        model.set_adapters("a", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="No adapter loaded"):
        Tiny().disable_adapters()
    with pytest.raises(ValueError, match="Adapter name b not found"):
        model.save_lora_adapter("unused", adapter_name="b")


def test_set_adapters_weights_disable_and_call_scale():
    model = _model_with("a")
    plain = _model_with()(X)
    full = model(X)
    model.set_adapters("a", weights=0.0)
    assert torch.allclose(model(X), plain)
    model.set_adapters("a", weights=1.0)
    assert torch.allclose(model(X, cross_attention_kwargs={"scale": 0.0}), plain)
    assert torch.allclose(model(X), full)  # the call scale is undone after the call
    model.disable_adapters()
    assert torch.allclose(model(X), plain)
    model.enable_adapters()
    assert torch.allclose(model(X), full)


def test_delete_last_adapter_and_unload_restore_plain_layers():
    model = _model_with("a", "b")
    model.delete_adapters(["a", "b"])
    assert type(model.to_q) is nn.Linear and "peft_config" not in model.__dict__
    model = _model_with("a")
    model.fuse_lora()
    fused = model(X)
    model.unload_lora()
    assert type(model.to_q) is nn.Linear and torch.allclose(model(X), fused)  # fused weights stay


def test_save_and_load_lora_adapter_round_trip(tmp_path):
    model = _model_with("a")
    model.save_lora_adapter(tmp_path, adapter_name="a")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert sorted(load_file(path)) == ["to_k.lora_A.weight", "to_k.lora_B.weight", "to_q.lora_A.weight",
                                       "to_q.lora_B.weight"]
    assert json.loads(check_safetensors_header(path)["__metadata__"]["lora_adapter_metadata"])["lora_alpha"] == 2
    fresh = _model_with()
    fresh.load_lora_adapter(tmp_path, prefix=None, adapter_name="a")  # saved from peft: back as peft's layers
    assert isinstance(fresh.to_q, peft.tuners.lora.LoraLayer) and list(fresh.peft_config) == ["a"]
    assert torch.allclose(fresh(X), model(X), atol=1e-6)
    with pytest.raises(ValueError, match="no key starts with the prefix 'unet'"):
        _model_with().load_lora_adapter(tmp_path, prefix="unet")
    fresh.save_lora_adapter(tmp_path / "again", adapter_name="a")
    assert load_file(tmp_path / "again" / "pytorch_lora_weights.safetensors").keys() == load_file(path).keys()


def test_a_file_saved_from_own_layers_loads_into_own_layers(tmp_path):
    model = _model_with()
    generator = torch.Generator().manual_seed(1)
    model.load_lora_adapter({"to_q.lora_A.weight": torch.randn(2, 4, generator=generator),
                             "to_q.lora_B.weight": torch.randn(4, 2, generator=generator)}, prefix=None,
                            adapter_name="a")
    model.save_lora_adapter(tmp_path, adapter_name="a")  # diffusekit's metadata: no peft_type
    fresh = _model_with()
    fresh.load_lora_adapter(tmp_path, prefix=None, adapter_name="a")
    assert isinstance(fresh.to_q, layers.LoraLayer) and "peft_config" not in fresh.__dict__
    assert torch.allclose(fresh(X), model(X), atol=1e-6)


def test_add_adapter_keeps_the_configs_of_the_other_adapters():
    model = _model_with("a", "b")
    assert list(model.peft_config) == ["a", "b"] and model.peft_config["a"] is not model.peft_config["b"]


def test_pipeline_api_covers_peft_and_own_layers(tmp_path):
    pipe = Pipe()
    plain = pipe.unet(X)
    pipe.text_encoder.add_adapter(_config(), adapter_name="te")
    generator = torch.Generator().manual_seed(1)
    lora = {"to_q.lora_A.weight": torch.randn(2, 4, generator=generator),
            "to_q.lora_B.weight": torch.randn(4, 2, generator=generator)}
    Pipe.save_lora_weights(tmp_path, unet_lora_layers=lora)
    pipe.load_lora_weights(tmp_path, adapter_name="file")
    assert pipe.get_list_adapters() == {"unet": ["file"], "text_encoder": ["te"]}
    assert pipe.get_active_adapters() == ["file", "te"]
    pipe.set_adapters(["file", "te"], adapter_weights=[{"unet": 0.0, "text_encoder": 1.0}, 1.0])
    assert torch.allclose(pipe.unet(X), plain)
    pipe.set_adapters(["file", "te"])
    with_lora = pipe.unet(X)
    pipe.disable_lora()
    assert torch.allclose(pipe.unet(X), plain)
    pipe.enable_lora()
    pipe.fuse_lora(components=["unet"], lora_scale=0.5)
    with pytest.raises(ValueError, match=r"\['vae'\] are not LoRA components"):
        pipe.fuse_lora(components=["vae"])
    pipe.unfuse_lora(components=["unet"])
    assert torch.allclose(pipe.unet(X), with_lora)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and type(pipe.text_encoder.to_q) is nn.Linear


def test_save_lora_weights_needs_layers_and_writes_prefixed_metadata(tmp_path):
    with pytest.raises(ValueError, match="needs at least one of unet_lora_layers"):
        Pipe.save_lora_weights(tmp_path)
    Pipe.save_lora_weights(tmp_path, unet_lora_layers={"to_q.lora_A.weight": torch.zeros(2, 4)},
                           unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4})
    state, metadata = Pipe.lora_state_dict(tmp_path, return_lora_metadata=True)
    assert list(state) == ["unet.to_q.lora_A.weight"] and metadata == {"unet.r": 2, "unet.lora_alpha": 4}


def test_fused_loras_counts_fused_adapters_of_both_kinds(tmp_path):
    pipe = Pipe()
    pipe.text_encoder.add_adapter(_config(), adapter_name="te")
    pipe.load_lora_weights({"unet.to_q.lora_A.weight": torch.ones(2, 4), "unet.to_q.lora_B.weight": torch.ones(4, 2)},
                           adapter_name="file")
    assert pipe.num_fused_loras == 0
    pipe.fuse_lora(components=["unet"])
    assert pipe.fused_loras == {"file"}
    pipe.fuse_lora(components=["text_encoder"])
    assert pipe.fused_loras == {"file", "te"} and pipe.num_fused_loras == 2
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0


def test_set_adapters_with_an_unknown_name_says_which():
    pipe = Pipe()
    pipe.unet.add_adapter(_config(), adapter_name="a")
    with pytest.raises(ValueError, match=r"Adapter name\(s\) \['test'\] not in the list of present adapters: \['a'\]"):
        pipe.set_adapters("test")


def test_a_loaded_file_is_the_only_active_adapter_of_the_models_it_reaches():
    pipe = Pipe()
    pipe.unet.add_adapter(_config(), adapter_name="trained")
    pipe.text_encoder.add_adapter(_config(), adapter_name="te")
    state = {f"unet.{k}": v for k, v in adapters.adapter_state_dict(pipe.unet, "trained")[0].items()}
    pipe.load_lora_weights(state, adapter_name="file")
    assert adapters.active_adapters(pipe.unet) == ["file"] and adapters.active_adapters(pipe.text_encoder) == ["te"]
    pipe.set_adapters("trained")
    trained = pipe.unet(X)
    pipe.set_adapters("file")  # the same weights as a file: the same function, the peft adapter off
    assert torch.allclose(pipe.unet(X), trained, atol=1e-6)


def test_set_adapters_ignores_components_the_pipeline_lacks_with_a_warning(caplog):
    pipe = Pipe()
    pipe.unet.add_adapter(_config(), adapter_name="a")
    plain = Pipe().unet(X)
    with caplog.at_level("WARNING", logger="diffusekit.loaders.lora"):
        pipe.set_adapters("a", adapter_weights={"unet": 0.0, "foo": 1.0, "bar": 1.0})
    assert "components in `adapter_weights` are not part of the pipeline: ['bar', 'foo']" in caplog.text
    assert torch.allclose(pipe.unet(X), plain)


def test_unload_and_delete_reset_the_transformers_peft_flag():
    """transformers' ``add_adapter`` reads ``peft_config`` while ``_hf_peft_config_loaded`` is set."""
    for remove in (adapters.unload, lambda model: adapters.delete(model, ["a"])):
        model = _model_with("a")
        model._hf_peft_config_loaded = True  # as transformers' add_adapter leaves it
        remove(model)
        assert "peft_config" not in model.__dict__ and model._hf_peft_config_loaded is False
