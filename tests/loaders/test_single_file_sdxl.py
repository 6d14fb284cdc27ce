"""SDXL single files without the reference: the shipped CLIP tokenizers and pipeline options when the
config folder lacks them, what a refiner file holds, and which text encoders a family has."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusekit import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusekit.loaders.single_file import pipeline_to_original, text_encoder_from_single_file
from diffusekit.models import clip_text
from sd_components import VAE_CONFIG
from diffusekit import StableDiffusionXLImg2ImgPipeline

UNET = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, down_block_types=("DownBlock2D",
            "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, norm_num_groups=1)


def _encoder(cls, width: int):
    """A 1-layer encoder with CLIP's full vocabulary, so the shipped tokenizers fit it."""
    config = CLIPTextConfig(hidden_size=width, intermediate_size=16, num_attention_heads=4, num_hidden_layers=1,
                            projection_dim=32,
                            hidden_act="gelu" if cls is CLIPTextModelWithProjection else "quick_gelu")
    return cls(config).eval()


@pytest.fixture(scope="module", params=["base", "refiner"])
def written(request, tmp_path_factory):
    """(kind, the parts, a config folder with model configs only, the original-layout file)."""
    torch.manual_seed(0)
    refiner = request.param == "refiner"
    parts = dict(unet=UNet2DConditionModel(**UNET, cross_attention_dim=40 if refiner else 64),
                 vae=AutoencoderKL(**VAE_CONFIG), text_encoder=None if refiner else _encoder(CLIPTextModel, 24),
                 text_encoder_2=_encoder(CLIPTextModelWithProjection, 40))
    folder = tmp_path_factory.mktemp(request.param)
    for name, model in parts.items():
        if model is not None:
            model.save_pretrained(folder / name)
    EulerDiscreteScheduler().save_config(folder / "scheduler")
    path = folder / "model.safetensors"
    save_file(pipeline_to_original(type("Parts", (), parts)), str(path))
    return request.param, parts, folder, path


def test_shipped_tokenizers_and_pipeline_options_fill_what_the_folder_lacks(written):
    kind, parts, folder, path = written
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=folder)
    for name, model in parts.items():
        loaded = getattr(pipe, name)
        if model is None:
            assert loaded is None
            continue
        expected = model.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items()), name
    assert pipe.tokenizer_2.pad_token == "!" and len(pipe.tokenizer_2) == 49408
    if kind == "base":
        assert pipe.tokenizer.pad_token == "<|endoftext|>"
        assert pipe.config.requires_aesthetics_score is False and pipe.config.force_zeros_for_empty_prompt is True
    else:  # the shipped sdxl_refiner/model_index.json
        assert pipe.tokenizer is None
        assert pipe.config.requires_aesthetics_score is True and pipe.config.force_zeros_for_empty_prompt is False
    chosen = StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=folder, requires_aesthetics_score=False)
    assert chosen.config.requires_aesthetics_score is False  # given options win


def test_text_encoders_alone_and_what_a_family_lacks(written):
    kind, parts, folder, path = written
    second = text_encoder_from_single_file(path, folder / "text_encoder_2", component="text_encoder_2")
    assert isinstance(second, clip_text.CLIPTextModelWithProjection)
    assert torch.equal(second.text_projection.weight, parts["text_encoder_2"].text_projection.weight)
    if kind == "refiner":
        with pytest.raises(ValueError, match=r"sdxl_refiner checkpoints hold no text_encoder \(they hold "
                                             r"\['text_encoder_2'\]\)"):
            text_encoder_from_single_file(path, folder / "text_encoder_2", component="text_encoder")
    else:
        first = text_encoder_from_single_file(path, folder / "text_encoder")  # the family's first
        assert type(first) is clip_text.CLIPTextModel
    unet = UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet")
    assert torch.equal(unet.add_embedding.linear_1.weight, parts["unet"].add_embedding.linear_1.weight)

