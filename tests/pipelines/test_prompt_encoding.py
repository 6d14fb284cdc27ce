"""Prompt encoding: the reference's truncation path and the opt-in A1111 prompt weighting."""

import copy
import logging
import math

import pytest
import torch

from diffusekit.pipelines.guidance import apply_guidance, rescale_noise_cfg
from diffusekit.pipelines.prompt_encoding import (
    encode_prompt,
    encode_weighted_text,
    mean_restoring_factor,
    parse_prompt_attention,
    weighted_token_windows,
)
from sd_components import tiny_text_encoder, tiny_tokenizer


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return tiny_text_encoder(tokenizer), tokenizer


@pytest.fixture(scope="module")
def biased_clip(clip):
    """The tiny encoder with a final layer-norm bias, so its hidden states have a mean far from 0."""
    text_encoder, tokenizer = clip
    biased = copy.deepcopy(text_encoder)
    with torch.no_grad():
        getattr(biased, "text_model", biased).final_layer_norm.bias.fill_(0.3)
    return biased, tokenizer


def _expected_window(text_encoder, ids: list[int], weights: list[float]) -> torch.Tensor:
    """The documented rule, computed independently: e * w, rescaled to e's mean unless a mean is ~0."""
    with torch.no_grad():
        e = text_encoder(torch.tensor([ids]))[0][0]
    weighted = e * torch.tensor(weights)[:, None]
    if e.mean().abs() > 1e-3 * e.abs().mean() and weighted.mean().abs() > 1e-3 * weighted.abs().mean():
        return weighted * (e.mean() / weighted.mean())
    return weighted


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_parse_prompt_attention():
    assert parse_prompt_attention("a (cat:1.5) dog") == [("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]
    runs = dict(parse_prompt_attention("((x)) [y] (z"))
    assert runs["x"] == pytest.approx(1.21) and runs["y"] == pytest.approx(1 / 1.1) and runs["z"] == pytest.approx(1.1)
    assert parse_prompt_attention(r"\(lit\) ok)") == [("(lit) ok)", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert dict(parse_prompt_attention("((a:2))"))["a"] == pytest.approx(2.2)


@torch.no_grad()
@pytest.mark.parametrize("encoder", ["clip", "biased_clip"])
def test_weighted_short_prompt_matches_rule(encoder, request):
    text_encoder, tok = request.getfixturevalue(encoder)
    got = encode_weighted_text(text_encoder, tok, ["the (cat:1.5) [dog]"])
    body = _ids(tok, "the") + _ids(tok, "cat") + _ids(tok, "dog")
    weights = [1.0, 1.0, 1.5, 1 / 1.1]
    pad = 77 - 2 - len(body)
    ids = [tok.bos_token_id, *body, tok.eos_token_id] + [tok.pad_token_id] * pad
    expected = _expected_window(text_encoder, ids, weights + [1.0] * (pad + 1))
    assert got.shape == (1, 77, 32)
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_weighted_long_prompt_is_chunked_and_negative_padded(clip, caplog):
    text_encoder, tok = clip
    words = ["the", "cat", "and", "dog"] * 25  # 100 tokens -> windows of 75 + 25
    prompt = " ".join(words[:50]) + " (" + " ".join(words[50:]) + ":0.8)"
    with caplog.at_level(logging.WARNING):
        embeds, negative = encode_prompt(text_encoder, tok, prompt, "cpu", num_images_per_prompt=2,
                                         do_classifier_free_guidance=True, negative_prompt="dog",
                                         prompt_weighting="a1111")
    assert not [r for r in caplog.records if "truncated" in r.message]
    assert embeds.shape == negative.shape == (2, 154, 32)
    ids = [i for w in words for i in _ids(tok, w)]
    weights = [1.0] * 50 + [0.8] * 50
    first = _expected_window(text_encoder, [tok.bos_token_id, *ids[:75], tok.eos_token_id], [1.0, *weights[:75], 1.0])
    rest = 75 - 25
    second = _expected_window(text_encoder, [tok.bos_token_id, *ids[75:], tok.eos_token_id] + [tok.pad_token_id] * rest,
                              [1.0, *weights[75:], 1.0] + [1.0] * rest)
    torch.testing.assert_close(embeds[1], torch.cat([first, second]), atol=1e-6, rtol=1e-5)
    # the negative prompt gets an empty second window so both halves of the guidance batch match
    empty = text_encoder(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0][0]
    torch.testing.assert_close(negative[0, 77:], empty, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_unweighted_a1111_equals_default_and_default_truncates(clip, caplog):
    text_encoder, tok = clip
    plain, _ = encode_prompt(text_encoder, tok, "the cat", "cpu", 1, False)
    weighted, _ = encode_prompt(text_encoder, tok, "the cat", "cpu", 1, False, prompt_weighting="a1111")
    torch.testing.assert_close(plain, weighted, atol=0, rtol=0)
    with caplog.at_level(logging.WARNING):
        long, _ = encode_prompt(text_encoder, tok, "the cat " * 40 + "zebra", "cpu", 1, False)
    assert long.shape == (1, 77, 32)
    assert any("truncated" in r.message and "zebra" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="prompt_weighting"):
        encode_prompt(text_encoder, tok, "x", "cpu", 1, False, prompt_weighting="compel")


@torch.no_grad()
def test_zero_mean_hidden_states_stay_finite_and_keep_the_weights(clip):
    """Layer-normed states without a bias have a mean of exactly 0: no rescale, no NaN."""
    text_encoder, tok = clip
    plain, _ = encode_prompt(text_encoder, tok, "the cat", "cpu", 1, False)
    assert plain.mean().abs() < 1e-6
    weights = {}
    for prompt in ("the cat", "(the cat:1.0)", "(the cat:1.3)", "[the] (cat:2)"):
        weights[prompt], _ = encode_prompt(text_encoder, tok, prompt, "cpu", 1, False, prompt_weighting="a1111")
        assert torch.isfinite(weights[prompt]).all(), prompt
    torch.testing.assert_close(weights["the cat"], plain, atol=0, rtol=0)
    torch.testing.assert_close(weights["(the cat:1.0)"], plain, atol=0, rtol=0)
    assert not torch.allclose(weights["(the cat:1.3)"], plain)
    torch.testing.assert_close(weights["(the cat:1.3)"][0, 1:3], 1.3 * plain[0, 1:3])  # no rescale: e * w


@torch.no_grad()
def test_rescale_restores_the_mean(biased_clip):
    text_encoder, tok = biased_clip
    plain, _ = encode_prompt(text_encoder, tok, "the cat", "cpu", 1, False)
    one, _ = encode_prompt(text_encoder, tok, "(the cat:1.0)", "cpu", 1, False, prompt_weighting="a1111")
    weighted, _ = encode_prompt(text_encoder, tok, "(the cat:1.5)", "cpu", 1, False, prompt_weighting="a1111")
    torch.testing.assert_close(one, plain, atol=0, rtol=0)
    assert not torch.allclose(weighted, plain)
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=1e-6, rtol=1e-5)


def test_mean_restoring_factor_guards_a_zero_mean():
    embeds = torch.tensor([[[1.0, -1.0], [2.0, -2.0]], [[1.0, 2.0], [3.0, 4.0]]])
    weighted = embeds * torch.tensor([[2.0], [1.0]])
    factor = mean_restoring_factor(embeds, weighted)
    assert factor.shape == (2, 1, 1)
    assert factor[0].item() == 1.0  # both means are 0
    assert factor[1].item() == pytest.approx(2.5 / 3.25)
    assert mean_restoring_factor(embeds, torch.full_like(embeds, math.inf))[1].item() == 1.0


@torch.no_grad()
def test_ten_thousand_token_prompt_is_chunked_and_finite(clip):
    text_encoder, tok = clip
    prompt = "the (cat:1.4) and [dog] " * 2500
    windows = weighted_token_windows(tok, prompt)
    assert len(windows) == math.ceil(10_000 / 75)
    embeds = encode_weighted_text(text_encoder, tok, [prompt])
    assert embeds.shape == (1, 77 * len(windows), 32) and torch.isfinite(embeds).all()
    ids, weights = windows[-1]
    torch.testing.assert_close(embeds[0, -77:], _expected_window(text_encoder, ids, weights), atol=1e-5, rtol=1e-5)


def test_guidance_combine_and_rescale():
    torch.manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    guided = apply_guidance(torch.cat([uncond, cond]), 5.0)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond))
    full = rescale_noise_cfg(guided, cond, guidance_rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    torch.testing.assert_close(apply_guidance(torch.cat([uncond, cond]), 5.0, 0.5), 0.5 * full + 0.5 * guided)
