"""SDXL textual inversion files (A1111 ``clip_l`` / ``clip_g``) on pipelines with one or two text
encoders: what goes where, what is refused, and that nothing is added when anything is wrong."""

import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusekit.loaders.textual_inversion import TextualInversionLoaderMixin
from sd_components import tiny_tokenizer


def _encoder(tokenizer, width: int, cls=CLIPTextModel):
    config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                            vocab_size=len(tokenizer), projection_dim=8)
    torch.manual_seed(0)
    return cls(config).eval()


class Holder(TextualInversionLoaderMixin):
    def __init__(self, folder, first: bool = True, second: bool = True):
        self.tokenizer = tiny_tokenizer(folder / "one") if first else None
        self.text_encoder = _encoder(self.tokenizer, 24) if first else None
        self.tokenizer_2 = tiny_tokenizer(folder / "two") if second else None
        self.text_encoder_2 = _encoder(self.tokenizer_2, 40, CLIPTextModelWithProjection) if second else None


def _file(folder, name="toy", clip_g=None):
    gen = torch.Generator().manual_seed(1)
    path = folder / f"{name}.safetensors"
    clip_g = torch.randn(1, 40, generator=gen) if clip_g is None else clip_g
    save_file({"clip_l": torch.randn(1, 24, generator=gen), "clip_g": clip_g}, str(path))
    return path


def test_refiner_takes_clip_g_and_says_clip_l_was_left(tmp_path, caplog):
    pipe = Holder(tmp_path, first=False)
    with caplog.at_level(logging.WARNING, logger="diffusekit.loaders.textual_inversion"):
        pipe.load_textual_inversion(_file(tmp_path))
    assert "toy" in pipe.tokenizer_2.get_vocab()
    assert "no text encoder for the embedding's ['clip_l']" in caplog.text


def test_one_encoder_pipeline_takes_clip_l(tmp_path, caplog):
    pipe = Holder(tmp_path, second=False)
    with caplog.at_level(logging.WARNING, logger="diffusekit.loaders.textual_inversion"):
        pipe.load_textual_inversion(_file(tmp_path))
    assert "toy" in pipe.tokenizer.get_vocab() and "['clip_g']" in caplog.text


def test_nothing_is_added_when_one_entry_is_bad(tmp_path):
    pipe = Holder(tmp_path)
    sizes = len(pipe.tokenizer), len(pipe.tokenizer_2)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*NaN"):
        pipe.load_textual_inversion(_file(tmp_path, "bad", clip_g=torch.full((1, 40), float("nan"))))
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes


def test_explicit_encoder_must_fit_exactly_one_entry(tmp_path):
    pipe = Holder(tmp_path)
    path = tmp_path / "same.safetensors"
    save_file({"clip_l": torch.zeros(1, 24), "clip_g": torch.ones(1, 24)}, str(path))
    with pytest.raises(ValueError, match=r"same\.safetensors: 2 of the SDXL embedding's entries .* are 24 wide"):
        pipe.load_textual_inversion(path, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer and a text encoder"):
        Holder(tmp_path, first=False, second=False).load_textual_inversion(_file(tmp_path))
