"""LoRA files with NaN/inf weights or malformed alphas, and textual-inversion tokens that cannot be
added: ValueError naming the file and the key or token."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from diffusekit import StableDiffusionPipeline, UNet2DConditionModel
from diffusekit.weights import WeightsError
from lora_files import kohya_layout, lora_tensors, peft_layout
from sd_components import UNET_CONFIG, tiny_text_encoder, tiny_tokenizer

KOHYA_KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture
def pipe(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    return StableDiffusionPipeline(vae=None, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**UNET_CONFIG).eval(), scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _saved(tmp_path, state: dict, metadata: dict | None = None):
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_non_finite_weight_names_file_and_key(pipe, tmp_path, layout, bad):
    state = (peft_layout if layout == "peft" else kohya_layout)(lora_tensors(pipe, seed=1))
    key = sorted(k for k in state if "up" in k or "lora_B" in k)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = bad
    path = _saved(tmp_path, state)
    with pytest.raises(ValueError, match=rf"{path.name}.*{key} holds NaN or infinite values"):
        pipe.load_lora_weights(str(path))
    assert not pipe.get_list_adapters()


@pytest.mark.parametrize("alpha", [torch.tensor(math.nan), torch.tensor(math.inf), torch.tensor([1.0, 2.0])])
def test_bad_kohya_alpha_names_the_key(pipe, tmp_path, alpha):
    state = kohya_layout(lora_tensors(pipe, seed=2))
    state[f"{KOHYA_KEY}.alpha"] = alpha
    path = _saved(tmp_path, state)
    message = "must be a single number" if alpha.numel() > 1 else "holds NaN or infinite values"
    with pytest.raises(ValueError, match=rf"{path.name}: {KOHYA_KEY}\.alpha {message}"):
        pipe.load_lora_weights(str(path))


def test_non_finite_metadata_alpha_names_the_field(pipe, tmp_path):
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "nan"})}
    path = _saved(tmp_path, peft_layout(lora_tensors(pipe, seed=3)), metadata)
    with pytest.raises(WeightsError, match=rf"{path.name}: the metadata's unet.lora_alpha must be a finite"):
        pipe.load_lora_weights(str(path))


def test_valid_lora_still_loads(pipe, tmp_path):
    pipe.load_lora_weights(str(_saved(tmp_path, kohya_layout(lora_tensors(pipe, seed=4), alpha=1.5))))
    assert pipe.get_list_adapters() == {"text_encoder": ["default_0"], "unet": ["default_0"]}


@pytest.mark.parametrize("token", ["", "   ", "\t", "cat", "the", "Cat", "x", "<|endoftext|>"])
def test_textual_inversion_token_refused(pipe, token):
    with pytest.raises(ValueError, match="token") as error:
        pipe.load_textual_inversion(torch.zeros(32), token=token)
    assert repr(token) in str(error.value)
    assert token not in pipe.tokenizer.get_added_vocab() or token == "<|endoftext|>"


def test_textual_inversion_new_token_loads_and_nan_is_refused(pipe):
    with pytest.raises(ValueError, match="'<bad>' holds NaN"):
        pipe.load_textual_inversion(torch.full((32,), math.nan), token="<bad>")
    pipe.load_textual_inversion(torch.ones(2, 32), token="<cat-toy>")
    assert {"<cat-toy>", "<cat-toy>_1"} <= set(pipe.tokenizer.get_added_vocab())
