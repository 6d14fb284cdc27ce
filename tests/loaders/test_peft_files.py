"""LoRA files saved from peft adapters load back as peft adapters (loaders/peft_files.py): the config from the
file's metadata (checked by peft), DoRA, and missing / unexpected keys named (strict) or warned about."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusekit.loaders import lora_hotswap
from diffusekit.loaders import lora_layers as layers
from diffusekit.weights import WeightsError, check_safetensors_header
from lora_files import Tiny

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

FILE = "pytorch_lora_weights.safetensors"
X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def _saved(tmp_path, **options) -> tuple[Tiny, peft.LoraConfig]:
    """A model with a trained-looking peft adapter 'a', saved to ``tmp_path``."""
    torch.manual_seed(0)
    model = Tiny()
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_k"], init_lora_weights=False, **options)
    model.add_adapter(config, adapter_name="a")
    model.save_lora_adapter(tmp_path, adapter_name="a")
    return model, config


def _fresh() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.mark.parametrize("options", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "bias"])
def test_peft_file_comes_back_as_the_saved_peft_adapter(tmp_path, options):
    model, config = _saved(tmp_path, **options)
    fresh = _fresh()
    fresh.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True, low_cpu_mem_usage=True)
    assert isinstance(fresh.to_q, peft.tuners.lora.LoraLayer)
    assert fresh.peft_config["default_0"].to_dict() == config.to_dict()
    saved, retrieved = load_file(tmp_path / FILE), get_peft_model_state_dict(fresh, adapter_name="default_0")
    assert saved.keys() == retrieved.keys() and all(torch.equal(saved[k], retrieved[k]) for k in saved)
    with torch.no_grad():
        assert torch.allclose(fresh(X), model(X), atol=1e-6)
        if not options:  # a call scale of 0 leaves the base layers (DoRA still applies its magnitudes, as in peft)
            assert torch.allclose(fresh(X, cross_attention_kwargs={"scale": 0.0}), _fresh()(X), atol=1e-6)
    assert fresh.active_adapters() == ["default_0"]


def test_metadata_peft_refuses_raises_its_type_error_naming_the_file(tmp_path):
    _, config = _saved(tmp_path)
    metadata = {**config.to_dict(), "foo": 1}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    save_file(load_file(tmp_path / FILE), tmp_path / FILE,
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    model = _fresh()
    with pytest.raises(TypeError, match=r"pytorch_lora_weights.safetensors.*`LoraConfig` class could not be "
                                        r"instantiated.*'foo'") as caught:
        model.load_lora_adapter(tmp_path, prefix=None)
    assert isinstance(caught.value.__cause__, TypeError)
    assert type(model.to_q) is nn.Linear and "peft_config" not in model.__dict__


def test_metadata_of_another_peft_method_is_refused(tmp_path):
    _, config = _saved(tmp_path)
    metadata = json.dumps({**config.to_dict(), "peft_type": "LOHA", "target_modules": ["to_q"]})
    save_file(load_file(tmp_path / FILE), tmp_path / FILE, metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(ValueError, match="peft LOHA config; load_lora_adapter reads LoRA adapters only"):
        _fresh().load_lora_adapter(tmp_path, prefix=None)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_and_unexpected_keys_raise_naming_them_or_warn_with_strict_false(tmp_path, caplog, change):
    _saved(tmp_path)
    state = load_file(tmp_path / FILE)
    if change == "missing":
        key = "to_q.lora_A.weight"
        del state[key]
    else:
        key = "to_q.lora_A.weight.diffusers_cat"
        state[key] = torch.tensor(1.0)
    save_file(state, tmp_path / FILE, metadata=check_safetensors_header(tmp_path / FILE)["__metadata__"])
    model = _fresh()
    with pytest.raises(WeightsError, match=rf"pytorch_lora_weights.safetensors: .*{key}.*strict=False"):
        model.load_lora_adapter(tmp_path, prefix=None, adapter_name="a")
    assert type(model.to_q) is nn.Linear and "peft_config" not in model.__dict__  # nothing left injected
    with caplog.at_level("WARNING", logger="diffusekit.loaders.peft_files"):
        model.load_lora_adapter(tmp_path, prefix=None, adapter_name="a", strict=False)
    assert key in caplog.text and list(model.peft_config) == ["a"]


def test_a_model_prepared_for_hotswap_loads_peft_files_into_its_slots(tmp_path):
    model, _ = _saved(tmp_path)
    fresh = _fresh()
    lora_hotswap.enable_lora_hotswap(fresh, target_rank=2)
    fresh.load_lora_adapter(tmp_path, prefix=None, adapter_name="a")
    assert isinstance(fresh.to_q, layers.HotswapLoraLayer) and "peft_config" not in fresh.__dict__
    with torch.no_grad():
        assert torch.allclose(fresh(X), model(X), atol=1e-6)
