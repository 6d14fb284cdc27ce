"""The shipped CLIP tokenizer: the ids of SD's tokenizers, written once to the cache, and used by
``from_single_file`` / ``convert`` when no tokenizer or config is given."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusekit import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusekit.loaders import single_file, single_file_model
from diffusekit.loaders.clip_tokenizer import clip_tokenizer, clip_tokenizer_folder
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with SD's CLIP tokenizer


def test_sd1_tokenizer_ids():
    tokenizer = clip_tokenizer("sd1")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer("A Photo of a CAT!").input_ids == CAT_IDS[:-1] + [256, 49407]  # lower-cased; "!</w>"
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_sd2_tokenizer_pads_with_exclamation_mark():
    tokenizer = clip_tokenizer("sd2")
    assert len(tokenizer) == 49408 and tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=10).input_ids
    assert padded == CAT_IDS + [0, 0, 0]


def test_files_are_written_once_to_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(cache))
    folder = clip_tokenizer_folder("sd1")
    assert folder.parent == cache / "tokenizers"
    assert {p.name for p in folder.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\ni n\n")
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_folder("sd1") == folder and (folder / "vocab.json").stat().st_mtime_ns == stamp
    assert clip_tokenizer_folder("sd2") != folder
    with pytest.raises(ValueError, match="sd3"):
        clip_tokenizer_folder("sd3")


def test_each_call_gives_a_new_tokenizer():
    """Textual inversion adds tokens to a tokenizer: that must not leak into the next pipeline."""
    first = clip_tokenizer("sd1")
    first.add_tokens(["<toy>"])
    assert len(first) == 49409 and len(clip_tokenizer("sd1")) == 49408


# -- from_single_file without tokenizer or config --------------------------------------------------


def _pipeline(tokenizer, text_encoder):
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _full_vocab_text_encoder():
    """A tiny CLIP text encoder over the full 49408-token vocabulary (1.6M parameters)."""
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(1)
    return CLIPTextModel(config).eval()


def _tiny_shipped_configs(pipeline_folder, root):
    """Stand-ins for the shipped full-size configs: the tiny pipeline's, for both families, no tokenizer."""
    for family in ("sd1", "sd2"):
        for part in ("unet", "vae", "text_encoder", "scheduler"):
            shutil.copytree(pipeline_folder / part, root / family / part)
    return root


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def tiny_full_vocab(tmp_path_factory):
    """(pipeline folder, stand-in config root) of a tiny SD pipeline using the shipped tokenizer."""
    folder = tmp_path_factory.mktemp("sd")
    _pipeline(clip_tokenizer("sd1"), _full_vocab_text_encoder()).save_pretrained(folder)
    return folder, _tiny_shipped_configs(folder, tmp_path_factory.mktemp("configs"))


def test_single_file_loads_with_no_tokenizer_and_no_config(tiny_full_vocab, tmp_path, monkeypatch):
    folder, configs = tiny_full_vocab
    monkeypatch.setattr(single_file_model, "CONFIG_ROOT", configs)
    path = single_file.convert(folder, tmp_path / "model.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(path)
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and len(pipe.tokenizer) == 49408
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert np.array_equal(_images(pipe), _images(StableDiffusionPipeline.from_pretrained(folder)))

    # convert (file -> folder) writes the same tokenizer
    converted = single_file.convert(path, tmp_path / "folder")
    assert CLIPTokenizer.from_pretrained(converted / "tokenizer")("a photo of a cat").input_ids == CAT_IDS

    # an OpenCLIP text encoder (SD 2.x) gets the SD 2.x tokenizer
    sd2_path = single_file.convert(folder, tmp_path / "sd2.safetensors", text_encoder_layout="openclip")
    sd2 = StableDiffusionPipeline.from_single_file(sd2_path)
    assert sd2.tokenizer.pad_token == "!" and sd2.tokenizer.pad_token_id == 0


def test_text_encoder_that_does_not_fit_the_shipped_tokenizer(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    folder = tmp_path / "sd"
    _pipeline(tokenizer, tiny_text_encoder(tokenizer)).save_pretrained(folder)
    monkeypatch.setattr(single_file_model, "CONFIG_ROOT", _tiny_shipped_configs(folder, tmp_path / "configs"))
    path = single_file.convert(folder, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{len(tokenizer)} tokens.*tokenizer="):
        StableDiffusionPipeline.from_single_file(path)
    assert len(StableDiffusionPipeline.from_single_file(path, tokenizer=tokenizer).tokenizer) == len(tokenizer)
