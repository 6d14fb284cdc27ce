"""enable_lora_hotswap: a compiled denoiser loads, swaps, reweights and unloads LoRA adapters without
recompiling, with the eager pipeline's outputs; rank and target errors. "eager"/"aot_eager" backends."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from diffusekit.loaders import lora_hotswap
from diffusekit.pipelines.compile import compile_denoiser
from lora_files import lora_tensors, peft_layout
from test_compile import _sample, flux_inputs, fresh_dynamo, pipe, tiny_flux  # noqa: F401 (fixtures)


def _lora(pipe, seed: int, rank: int = 2) -> dict:
    return peft_layout(lora_tensors(pipe, seed=seed, rank=rank))


def _eager_references(pipe, a: dict, b: dict) -> dict[str, torch.Tensor]:
    """Outputs of the unprepared, uncompiled pipeline: no LoRA, A, B, and B at weight 0.5."""
    refs = {"base": _sample(pipe)}
    pipe.load_lora_weights(a, adapter_name="x")
    refs["a"] = _sample(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(b, adapter_name="x")
    refs["b"] = _sample(pipe)
    pipe.set_adapters("x", 0.5)
    refs["b_half"] = _sample(pipe)
    pipe.unload_lora_weights()
    return refs


@pytest.mark.parametrize("regional", [False, True], ids=["full", "regional"])
def test_load_swap_reweight_unload_never_recompile(pipe, regional):
    a, b = _lora(pipe, seed=1), _lora(pipe, seed=2, rank=4)
    refs = _eager_references(pipe, a, b)
    assert not torch.equal(refs["a"], refs["base"]) and not torch.equal(refs["a"], refs["b"])
    keys = list(pipe.unet.state_dict())
    pipe.enable_lora_hotswap(target_rank=4)
    counter = CompileCounterWithBackend("aot_eager")
    pipe.compile(regional=regional, backend=counter)
    torch.testing.assert_close(_sample(pipe), refs["base"], atol=1e-5, rtol=0)
    compiled = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.load_lora_weights(a, adapter_name="x")
        torch.testing.assert_close(_sample(pipe), refs["a"], atol=1e-5, rtol=0)
        pipe.load_lora_weights(b, adapter_name="x", hotswap=True)
        torch.testing.assert_close(_sample(pipe), refs["b"], atol=1e-5, rtol=0)
        pipe.set_adapters("x", 0.5)
        torch.testing.assert_close(_sample(pipe), refs["b_half"], atol=1e-5, rtol=0)
        pipe.unload_lora_weights()
        torch.testing.assert_close(_sample(pipe), refs["base"], atol=1e-5, rtol=0)
        pipe.load_lora_weights(a, adapter_name="y")  # a plain load after an unload
        torch.testing.assert_close(_sample(pipe), refs["a"], atol=1e-5, rtol=0)
    assert counter.frame_count == compiled and list(pipe.unet.state_dict()) == keys
    assert pipe.get_list_adapters() == {"unet": ["y"], "text_encoder": ["y"]}


def test_unloaded_hotswap_layers_give_the_base_output_exactly(pipe):
    base = _sample(pipe)
    pipe.enable_lora_hotswap(target_rank=4)
    assert torch.equal(_sample(pipe), base)
    pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x")
    pipe.disable_lora()  # the text encoder's adapter is off too
    assert torch.equal(_sample(pipe), base)
    pipe.enable_lora()
    pipe.unload_lora_weights()
    assert torch.equal(_sample(pipe), base)


def test_enable_after_the_first_load_prepares_its_layers(pipe):
    a, b = _lora(pipe, seed=1), _lora(pipe, seed=2)
    pipe.load_lora_weights(b, adapter_name="x")
    ref_b = _sample(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(a, adapter_name="x")
    with pytest.raises(RuntimeError, match="call enable_lora_hotswap before compile"):
        pipe.enable_lora_hotswap(target_rank=2)
    pipe.enable_lora_hotswap(target_rank=2, check_compiled="ignore")
    _, prepared = lora_hotswap.hotswap_layers(pipe.unet)
    assert len(prepared) == 8  # the layers of lora_files.UNET_TARGETS
    pipe.compile(regional=False, backend="eager")
    _sample(pipe)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.load_lora_weights(b, adapter_name="x", hotswap=True)
        torch.testing.assert_close(_sample(pipe), ref_b, atol=1e-5, rtol=0)


def test_rank_above_target_rank_is_refused_and_changes_nothing(pipe):
    pipe.enable_lora_hotswap(target_rank=2)
    pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x")
    before = _sample(pipe)
    with pytest.raises(ValueError, match=r"UNet2DConditionModel\.down_blocks\.1\.attentions\.0\.transformer_blocks"
                                         r"\.0\.attn1\.to_q has rank 3, above the hotswap target_rank 2"):
        pipe.load_lora_weights(_lora(pipe, seed=2, rank=3), adapter_name="x", hotswap=True)
    assert pipe.get_list_adapters()["unet"] == ["x"] and torch.equal(_sample(pipe), before)


def test_active_adapters_share_the_target_rank(pipe):
    pipe.enable_lora_hotswap(target_rank=3)
    pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x")
    pipe.load_lora_weights(_lora(pipe, seed=2), adapter_name="y")
    pipe.set_adapters(["x", "y"])
    with pytest.raises(ValueError, match=r"active LoRA adapters \['x', 'y'\] have ranks \[2, 2\] \(together 4\), "
                                         r"above the hotswap target_rank 3"):
        _sample(pipe)


def test_two_active_adapters_match_eager(pipe):
    a, b = _lora(pipe, seed=1), _lora(pipe, seed=2)
    pipe.load_lora_weights(a, adapter_name="x")
    pipe.load_lora_weights(b, adapter_name="y")
    pipe.set_adapters(["x", "y"], [0.7, 1.3])
    eager = _sample(pipe)
    pipe.unload_lora_weights()
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(a, adapter_name="x")
    pipe.load_lora_weights(b, adapter_name="y")
    pipe.set_adapters(["x", "y"], [0.7, 1.3])
    torch.testing.assert_close(_sample(pipe), eager, atol=1e-5, rtol=0)


def test_unprepared_target_and_argument_errors(pipe):
    pipe.enable_lora_hotswap(target_rank=4, target_modules=["to_q", "to_k"])
    with pytest.raises(ValueError, match=r"targets UNet2DConditionModel\.down_blocks\.1\.attentions\.0\."
                                         r"transformer_blocks\.0\.attn2\.to_out\.0, which enable_lora_hotswap did "
                                         r"not prepare"):
        pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x")
    assert pipe.get_list_adapters() == {}
    with pytest.raises(ValueError, match="hotswap=True replaces a loaded adapter, but there is no adapter 'x'"):
        pipe.load_lora_weights(_lora(pipe, seed=1), adapter_name="x", hotswap=True)
    with pytest.raises(ValueError, match="already prepared for LoRA hotswap with target_rank 4, not 8"):
        pipe.enable_lora_hotswap(target_rank=8)
    with pytest.raises(ValueError, match="target_rank must be a positive int, got 0"):
        pipe.enable_lora_hotswap(target_rank=0)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no Linear or ungrouped Conv2d layer"):
        pipe.enable_lora_hotswap(target_rank=4, target_modules=["nope"])


def test_check_compiled_on_a_compiled_model(pipe):
    pipe.compile(backend="eager")
    with pytest.raises(ValueError, match="check_compiled should be one of"):
        pipe.enable_lora_hotswap(target_rank=4, check_compiled="loud")
    with pytest.raises(RuntimeError, match="UNet2DConditionModel is already compiled or has LoRA adapters"):
        pipe.enable_lora_hotswap(target_rank=4)


def _flux_lora(model, seed: int, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"):
        weight = model.get_submodule(path).weight
        state[f"{path}.lora_A.weight"] = torch.randn(rank, weight.shape[1], generator=gen) * 0.3
        state[f"{path}.lora_B.weight"] = torch.randn(weight.shape[0], rank, generator=gen) * 0.3
    return state


@torch.no_grad()
def test_flux_transformer_swaps_without_recompiling():
    model, (_, inputs) = tiny_flux(), flux_inputs()
    a, b = _flux_lora(model, seed=1, rank=2), _flux_lora(model, seed=2, rank=4)
    refs = {"base": model(**inputs).sample}
    for name, state in (("a", a), ("b", b)):
        model.load_lora_adapter(state, prefix=None, adapter_name="x")
        refs[name] = model(**inputs).sample
        model.unload_lora()
    lora_hotswap.enable_lora_hotswap(model, target_rank=4, target_modules=["to_q", "ff.net.2", "proj_out"])
    counter = CompileCounter()
    compile_denoiser(model, regional=False, backend=counter)
    model(**inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, state in (("a", a), ("b", b)):
            model.load_lora_adapter(state, prefix=None, adapter_name="x")
            torch.testing.assert_close(model(**inputs).sample, refs[name], atol=1e-5, rtol=0)
            model.unload_lora()
        torch.testing.assert_close(model(**inputs).sample, refs["base"], atol=1e-5, rtol=0)
    assert counter.frame_count == 1


@torch.no_grad()
def test_prepared_layers_follow_dtype_moves_and_keep_the_state_dict():
    model, (_, inputs) = tiny_flux(), flux_inputs()
    state = _flux_lora(model, seed=1, rank=2)
    keys = list(model.state_dict())
    model.load_lora_adapter(state, prefix=None, adapter_name="x")
    eager = model.double()(**{k: v.double() for k, v in inputs.items()}).sample
    model.unload_lora()
    lora_hotswap.enable_lora_hotswap(model.float(), target_rank=3)
    model.load_lora_adapter(state, prefix=None, adapter_name="x")
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert type(layer).__name__ == "HotswapLoraLinear" and layer.lora_hotswap_down.shape == (3, 32)
    model.double()
    assert layer.lora_hotswap_up.dtype == torch.float64 and list(model.state_dict()) == keys
    torch.testing.assert_close(model(**{k: v.double() for k, v in inputs.items()}).sample, eager, atol=1e-10, rtol=0)
