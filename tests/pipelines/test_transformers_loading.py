"""The fast path for CLIP text encoders gives what transformers' from_pretrained gives."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from diffusekit.pipelines.transformers_loading import load_transformers_component
from sd_components import tiny_text_encoder, tiny_tokenizer


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    folder = tmp_path_factory.mktemp("text_encoder")
    tiny_text_encoder(tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_fast_path_matches_transformers(encoder_folder, dtype, monkeypatch):
    expected = transformers.CLIPTextModel.from_pretrained(encoder_folder, **({"dtype": dtype} if dtype else {}))
    calls = []
    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", classmethod(lambda *a, **k: calls.append(k)))
    ours = load_transformers_component(transformers.CLIPTextModel, encoder_folder, dtype)
    assert not calls  # transformers' loader was not used
    assert not ours.training and ours.dtype == expected.dtype == (dtype or torch.float32)
    assert ours.config.dtype == expected.config.dtype
    assert ours.config._attn_implementation == expected.config._attn_implementation
    theirs = expected.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key
    assert torch.equal(ours.embeddings.position_ids, expected.embeddings.position_ids)
    ids = torch.tensor([[0, 5, 9, 3]])
    if dtype is None:
        assert torch.equal(ours(ids).last_hidden_state, expected(ids).last_hidden_state)


def test_unexpected_keys_go_through_transformers(encoder_folder, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_bytes((encoder_folder / "config.json").read_bytes())
    state = load_file(encoder_folder / "model.safetensors")
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    calls = []
    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained",
                        classmethod(lambda cls, path, **k: calls.append((path, k)) or "transformers"))
    assert load_transformers_component(transformers.CLIPTextModel, tmp_path, torch.float16) == "transformers"
    assert calls == [(tmp_path, {"dtype": torch.float16})]
