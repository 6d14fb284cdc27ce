"""SDXL single files in the original SGM layout: base and refiner written from reference-saved tiny
folders, read back by the reference and by diffusekit, equal to the folder load; convert both ways;
the shipped full-size configs mapped to the original key names (on the meta device)."""

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusekit
from diffusekit.loaders import single_file_layout as layout
from diffusekit.loaders.single_file import pipeline_to_original
from diffusekit.models import clip_text
from diffusekit.weights import WeightsError
from sdxl_loader_parts import save_reference_sdxl
from diffusekit import StableDiffusionXLImg2ImgPipeline

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", params=["base", "refiner"])
def sdxl(request, tmp_path_factory):
    """(kind, reference folder, original-layout file written from our load of it)."""
    root = tmp_path_factory.mktemp(request.param)
    folder = save_reference_sdxl(root / "folder", refiner=request.param == "refiner")
    path = root / "model.safetensors"
    save_file(pipeline_to_original(StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)), str(path))
    return request.param, folder, path


def _assert_same_models(ours, expected):
    for name in MODELS:
        got, want = getattr(ours, name), getattr(expected, name)
        if want is None:
            assert got is None, name
            continue
        got_state, want_state = got.state_dict(), want.state_dict()
        assert got_state.keys() == want_state.keys(), name
        assert all(torch.equal(got_state[k], want_state[k]) for k in want_state), name


def test_the_file_is_in_the_original_layout_the_reference_reads(sdxl):
    kind, folder, path = sdxl
    keys = set(load_file(str(path)))
    assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
            "first_stage_model.decoder.up.0.block.1.conv2.weight"} <= keys
    openclip = layout.SDXL_OPENCLIP_PREFIX if kind == "base" else layout.REFINER_OPENCLIP_PREFIX
    assert {openclip + "text_projection", openclip + "transformer.resblocks.2.attn.in_proj_weight"} <= keys
    assert any(k.startswith(layout.SDXL_CLIP_PREFIX) for k in keys) == (kind == "base")
    reference_cls = (diffusers.StableDiffusionXLPipeline if kind == "base"
                     else diffusers.StableDiffusionXLImg2ImgPipeline)
    from_file = reference_cls.from_single_file(str(path), config=str(folder))
    _assert_same_models(from_file, reference_cls.from_pretrained(folder))


def test_single_file_loads_equal_to_the_folder(sdxl):
    kind, folder, path = sdxl
    ours = StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=folder)
    _assert_same_models(ours, StableDiffusionXLImg2ImgPipeline.from_pretrained(folder))
    assert isinstance(ours.text_encoder_2, clip_text.CLIPTextModelWithProjection)
    assert type(ours.scheduler).__name__ == "EulerDiscreteScheduler"
    assert ours.scheduler.config.timestep_spacing == "leading"
    assert len(ours.tokenizer_2) == ours.text_encoder_2.config.vocab_size
    assert (ours.tokenizer is None) == (kind == "refiner")
    assert ours.config.requires_aesthetics_score == (kind == "refiner")
    assert ours.config.force_zeros_for_empty_prompt == (kind == "base")


def test_missing_projection_names_the_file_and_key(sdxl, tmp_path):
    kind, folder, path = sdxl
    state = load_file(str(path))
    prefix = layout.SDXL_OPENCLIP_PREFIX if kind == "base" else layout.REFINER_OPENCLIP_PREFIX
    del state[prefix + "text_projection"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match=r"broken\.safetensors.*text_encoder_2.*text_projection\.weight"):
        StableDiffusionXLImg2ImgPipeline.from_single_file(tmp_path / "broken.safetensors", config=folder)


def test_convert_both_directions(sdxl, tmp_path):
    """file -> folder -> file gives the same tensors; the CLI runs the same conversion."""
    kind, folder, path = sdxl
    from diffusekit.cli import main

    assert main(["convert", str(path), str(tmp_path / "folder"), "--config", str(folder)]) == 0
    _assert_same_models(StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "folder"), StableDiffusionXLImg2ImgPipeline.from_pretrained(folder))
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    original, again = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_shipped_configs_give_the_full_size_original_keys_and_shapes(family):
    """The shipped SDXL 1.0 configs, built on the meta device: every UNet and text-encoder parameter
    has one original name, with the shapes of the released checkpoints."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusekit.loaders.single_file_model import _expected, component_config, detect_family

    unet_config = component_config("unet", family, None)
    unet_keys = _expected(diffusekit.UNet2DConditionModel, unet_config)
    names = layout.unet_name_map(unet_config)
    original = {layout.to_original(k, names): v.shape for k, v in unet_keys.items()}
    assert None not in original and len(original) == len(unet_keys)
    if family == "sdxl":
        expected = {"label_emb.0.0.weight": (1280, 2816), "input_blocks.0.0.weight": (320, 4, 3, 3),
                    "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                    "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                    "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                    "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1)}
    else:
        expected = {"label_emb.0.0.weight": (1536, 2560), "input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight":
                    (768, 1280), "middle_block.1.transformer_blocks.3.attn1.to_q.weight": (1536, 1536),
                    "output_blocks.2.1.conv.weight": (1536, 1536, 3, 3)}
    assert {k: tuple(original[k]) for k in expected} == expected
    te_config = {k: v for k, v in component_config("text_encoder_2", family, None).items() if not k.startswith("_")}
    with torch.device("meta"):
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**te_config))
    openclip = layout.to_openclip(text_encoder.state_dict())
    assert openclip["transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert openclip["text_projection"].shape == (1280, 1280) and len(openclip) == 32 * 12 + 5
    to_k = {f"{layout.UNET_PREFIX}{k}": v for k, v in original.items() if k.endswith("attn2.to_k.weight")}
    unet_only = {k: torch.empty(shape, device="meta") for k, shape in to_k.items()}
    assert detect_family(unet_only) == family  # a UNet-only file: by cross-attention width
