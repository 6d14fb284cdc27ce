"""diffusekit's T5 encoder and T5 tokenizer against transformers' (same files, same outputs)."""

import pytest
import torch
import transformers

from diffusekit.models.t5_encoder import T5EncoderModel
from diffusekit.tokenization import T5TokenizerFast
from flux_components import tiny_t5_tokenizer


def _reference(feed_forward_proj: str):
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
                                   feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20)
    torch.manual_seed(0)
    return transformers.T5EncoderModel(config).eval()


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_outputs_and_files_match_transformers(feed_forward_proj, tmp_path):
    ref = _reference(feed_forward_proj)
    ref.save_pretrained(tmp_path / "ref")
    ours = T5EncoderModel.from_pretrained(tmp_path / "ref")
    ids = torch.randint(0, 100, (2, 40))  # longer than max_distance: the log-spaced buckets are used
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"output_hidden_states": True}):
            expected, got = ref(ids, **kwargs), ours(ids, **kwargs)
            assert list(got.keys()) == list(expected.keys())
            torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)
            for a, b in zip(expected.hidden_states or (), got.hidden_states or ()):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "ours")
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_float16_keeps_wo_in_float32_like_transformers(tmp_path):
    _reference("gated-gelu").save_pretrained(tmp_path)
    ref = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16)
    ours = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    for theirs, mine in zip(ref.state_dict().values(), ours.state_dict().values()):
        assert mine.dtype == theirs.dtype
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(ours(ids)[0].float(), ref(ids)[0].float(), rtol=0, atol=1e-2)


def test_t5_tokenizer_matches_transformers(tmp_path):
    ref = tiny_t5_tokenizer()
    ref.save_pretrained(tmp_path)
    ours = T5TokenizerFast.from_pretrained(tmp_path)
    prompts = ["a photo of the cat", "", "red sky painting " * 200, "xyz Dog"]
    options = dict(padding="max_length", max_length=512, truncation=True, return_length=False,
                   return_overflowing_tokens=False, return_tensors="pt")
    for kwargs in (options, dict(padding="longest", return_tensors="pt"), {}):
        a, b = ref(prompts, **kwargs), ours(prompts, **kwargs)
        for key in ("input_ids", "attention_mask"):
            plain = [x.tolist() if isinstance(x, torch.Tensor) else x for x in (a[key], b[key])]
            assert plain[0] == plain[1], (kwargs, key)
    assert ours.pad_token_id == ref.pad_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.model_max_length == ref.model_max_length and len(ours) == len(ref)
    ids = ref(prompts[:2]).input_ids
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    with pytest.raises(TypeError, match="return_overflowing_tokens"):
        ours("x", return_overflowing_tokens=True)
