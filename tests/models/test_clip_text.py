"""diffusekit's CLIP text encoders and tokenizer against transformers' (same files, same outputs)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from diffusekit.loaders.clip_tokenizer import clip_tokenizer_folder
from diffusekit.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from diffusekit.tokenization import CLIPTokenizer
from diffusekit.weights import WeightsError

PAIRS = [(CLIPTextModel, transformers.CLIPTextModel),
         (CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection)]
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "  Hello,   WORLD!! it's 3.14 ",
           "naïve café Ünïcödé 東京 😀", "a (masterpiece:1.2), best quality, highly detailed " * 8,
           "don't won't they're I'd we'll", "tab\tnew\nline", "<|startoftext|>x<|endoftext|> y"]


def _reference(ref_cls, seed=0, **overrides):
    config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                  projection_dim=16, vocab_size=1000, bos_token_id=998, eos_token_id=999, pad_token_id=1)
    config.update(overrides)
    torch.manual_seed(seed)
    return ref_cls(transformers.CLIPTextConfig(**config)).eval()


def _plain(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _compare(ref_out, our_out):
    assert list(our_out.keys()) == [k for k in ref_out.keys() if k != "attentions"]
    for key, value in ref_out.items():
        if isinstance(value, tuple):
            assert len(value) == len(our_out[key])
            for a, b in zip(value, our_out[key]):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(our_out[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ours_cls,ref_cls", PAIRS)
@pytest.mark.parametrize("options", [dict(hidden_act="quick_gelu"), dict(hidden_act="gelu", eos_token_id=2)])
def test_outputs_match_transformers(ours_cls, ref_cls, options, tmp_path):
    ref = _reference(ref_cls, **options)
    ref.save_pretrained(tmp_path)
    ours = ours_cls.from_pretrained(tmp_path)
    assert not ours.training
    ids = torch.randint(2, 998, (2, 12))
    ids[:, 0], ids[0, 7], ids[1, 11] = 998, 999, 999
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"output_hidden_states": True}):
            _compare(ref(ids, **kwargs), ours(ids, **kwargs))
        assert torch.equal(ours(ids, return_dict=False)[0], ours(ids)[0])


@pytest.mark.parametrize("ours_cls,ref_cls", PAIRS)
def test_saves_load_in_transformers_and_back(ours_cls, ref_cls, tmp_path):
    ref = _reference(ref_cls)
    ref.save_pretrained(tmp_path / "ref")
    ours = ours_cls.from_pretrained(tmp_path / "ref", torch_dtype=torch.float16)
    assert ours.dtype == torch.float16 and ours.config.dtype == "float16"
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [ref_cls.__name__] and config["dtype"] == "float16"
    back = ref_cls.from_pretrained(tmp_path / "ours")
    assert back.state_dict().keys() == ref.state_dict().keys()
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor.half()), key


def test_legacy_text_model_prefix_loads(tmp_path):
    ref = _reference(transformers.CLIPTextModel)
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    legacy = {f"text_model.{k}": v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(legacy, tmp_path / "model.safetensors")
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids = torch.tensor([[998, 5, 9, 999]])
    torch.testing.assert_close(ours(ids).pooler_output, ref(ids).pooler_output, rtol=0, atol=1e-5)


def test_bad_weights_name_file_and_keys(tmp_path):
    _reference(transformers.CLIPTextModel).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = torch.zeros(1)
    del state["final_layer_norm.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*missing keys \[final_layer_norm\.bias\]"
                                           r".*unexpected keys \[extra\.weight\]"):
        CLIPTextModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_resize_token_embeddings_keeps_rows(tmp_path):
    _reference(transformers.CLIPTextModelWithProjection).save_pretrained(tmp_path)
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path)
    before = ours.get_input_embeddings().weight.clone()
    grown = ours.resize_token_embeddings(1003)
    assert grown is ours.get_input_embeddings() and grown.weight.shape == (1003, 32)
    assert torch.equal(grown.weight[:1000], before) and ours.config.vocab_size == 1003


def test_unsupported_activation_is_named():
    from diffusekit.models.clip_text import CLIPTextConfig

    with pytest.raises(ValueError, match="hidden_act 'swish'"):
        CLIPTextModel(CLIPTextConfig(hidden_act="swish", hidden_size=8, num_attention_heads=2,
                                     intermediate_size=8, num_hidden_layers=1))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tokenizer_matches_transformers(family, tmp_path):
    folder = clip_tokenizer_folder(family)
    ref, ours = transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    for options in (dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt"),
                    dict(padding="longest", return_tensors="pt"), dict(add_special_tokens=False)):
        a, b = ref(PROMPTS, **options), ours(PROMPTS, **options)
        for key in ("input_ids", "attention_mask"):
            assert _plain(a[key]) == _plain(b[key]), (options, key)
    for name in ("model_max_length", "pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert [ours.tokenize(p) for p in PROMPTS] == [ref.tokenize(p) for p in PROMPTS]
    ids = ref(PROMPTS).input_ids
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
    for tokenizer in (ref, ours):
        tokenizer.add_tokens(["<cat-toy>", "<Cat-Toy2>", "<cat-toy>_1"])
    prompt = "a <cat-toy> and <Cat-Toy2> and <cat-toy>_1 and <cat-toy2>"
    assert ours(prompt).input_ids == ref(prompt).input_ids and len(ours) == len(ref)
    assert ours.added_tokens_encoder == ref.added_tokens_encoder
    assert ours.get_vocab() == ref.get_vocab()
    ours.save_pretrained(tmp_path)
    for reloaded in (transformers.CLIPTokenizer.from_pretrained(tmp_path), CLIPTokenizer.from_pretrained(tmp_path)):
        assert reloaded(prompt).input_ids == ref(prompt).input_ids
        assert reloaded.pad_token_id == ref.pad_token_id and len(reloaded) == len(ref)


def test_tokenizer_errors_name_the_argument(tmp_path):
    ours = CLIPTokenizer.from_pretrained(clip_tokenizer_folder("sd1"))
    with pytest.raises(ValueError, match="return_tensors='np'"):
        ours("x", return_tensors="np")
    with pytest.raises(TypeError, match="stride"):
        ours("x", stride=2)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
