"""Loaders against the reference: LoRA (diffusers/peft and kohya layouts, scale, fuse, unload),
textual inversion (diffusers and A1111 formats), single original-layout checkpoints."""

import copy

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusekit
from lora_files import kohya_layout, lora_tensors, peft_layout
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer

pytest.importorskip("peft")  # the reference's LoRA backend

TOL = 1e-4
PROMPT = "the cat and dog"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    parts = dict(unet=diffusers.UNet2DConditionModel(**UNET_CONFIG), vae=diffusers.AutoencoderKL(**VAE_CONFIG),
                 text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
                 scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER_CONFIG))
    diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return folder


def _load(lib, folder):
    pipe = lib.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def pipes(sd_folder):
    return _load(diffusekit, sd_folder), _load(diffusers, sd_folder)


def _run(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                **kwargs).images


def _close(ours, ref, tol=TOL):
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()


# -- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_lora_matches_reference_scaled_fused_and_unloads_exactly(pipes, layout, tmp_path):
    ours, ref = pipes
    base = _run(ours)
    tensors = lora_tensors(ours, seed=1)
    if layout == "kohya":  # the reference drops kohya text-encoder attention keys (see the test below)
        tensors = {k: v for k, v in tensors.items() if "self_attn" not in k[1]}
    state = peft_layout(tensors) if layout == "peft" else kohya_layout(tensors)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    ours.load_lora_weights(str(path), adapter_name="style")
    ref.load_lora_weights(copy.deepcopy(state), adapter_name="style")
    assert ours.get_active_adapters() == ["style"]

    with_lora = _run(ours)
    assert np.abs(with_lora - base).max() > 1e-3  # the LoRA does something
    _close(with_lora, _run(ref))
    _close(_run(ours, cross_attention_kwargs={"scale": 0.5}), _run(ref, cross_attention_kwargs={"scale": 0.5}))

    ours.fuse_lora(lora_scale=1.0)
    ref.fuse_lora(lora_scale=1.0)
    _close(_run(ours), _run(ref))
    ours.unfuse_lora()
    _close(_run(ours), with_lora, tol=1e-6)

    ours.unload_lora_weights()
    assert np.array_equal(_run(ours), base)
    assert not any(type(m).__name__.startswith("Lora") for m in ours.unet.modules())


def test_kohya_text_encoder_attention_equals_peft_layout(pipes):
    """With transformers 5 the reference renames kohya ``self_attn`` text-encoder keys to names its
    text encoder lacks and silently skips them; here they apply, exactly as the same LoRA in the
    peft layout (which matches the reference above)."""
    ours, _ = pipes
    tensors = lora_tensors(ours, seed=6)
    ours.load_lora_weights(kohya_layout(tensors, alpha=2.0))
    kohya = _run(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights(peft_layout(tensors))
    assert np.array_equal(_run(ours), kohya)


def test_two_adapters_weights_and_delete(pipes):
    ours, ref = pipes
    first, second = lora_tensors(ours, seed=2), lora_tensors(ours, seed=3, rank=3)
    second = {k: v for k, v in second.items() if "self_attn" not in k[1]}  # see the test above
    for pipe in (ours, ref):
        pipe.load_lora_weights(peft_layout(first), adapter_name="a")
        pipe.load_lora_weights(kohya_layout(second, alpha=1.5), adapter_name="b")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["b"]
    assert ours.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}
    _close(_run(ours), _run(ref))
    for pipe in (ours, ref):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    _close(_run(ours), _run(ref))
    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=0.5)
    _close(_run(ours), _run(ref))
    ours.unfuse_lora()
    ref.unfuse_lora()
    for pipe in (ours, ref):
        pipe.delete_adapters("b")
    assert ours.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}


def test_lora_keys_that_match_nothing_are_reported(pipes):
    ours, _ = pipes
    state = peft_layout(lora_tensors(ours, seed=4))
    state["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(2, 8)
    state["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(8, 2)
    with pytest.raises(diffusekit.weights.WeightsError, match="no_such_block"):
        ours.load_lora_weights(state)
    assert ours.get_list_adapters() == {}
    ours.load_lora_weights(state, strict=False, adapter_name="partial")
    assert ours.get_list_adapters()["unet"] == ["partial"]
    with pytest.raises(diffusekit.weights.WeightsError, match="no key of this LoRA"):
        ours.load_lora_weights({"unet.nothing.lora_A.weight": torch.zeros(2, 8)}, strict=False)


# -- textual inversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "a1111_pt", "a1111_safetensors"])
def test_textual_inversion_matches_reference(pipes, fmt, tmp_path):
    ours, ref = pipes
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    if fmt == "diffusers":
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"<toy>": vectors}, str(path))
        ours.load_textual_inversion(str(tmp_path))
        ref.load_textual_inversion(str(tmp_path))
    elif fmt == "a1111_pt":
        path = tmp_path / "toy.pt"
        torch.save({"string_to_param": {"*": vectors}, "name": "<toy>", "step": 100}, path)
        ours.load_textual_inversion(str(path))
        ref.load_textual_inversion(str(path))
    else:
        path = tmp_path / "toy.safetensors"
        save_file({"emb_params": vectors}, str(path))
        ours.load_textual_inversion(str(path), token="<toy>")
        ref.load_textual_inversion(str(path), token="<toy>")
    assert ours.maybe_convert_prompt("a <toy> cat") == "a <toy> <toy>_1 <toy>_2 cat"
    _close(_run(ours, prompt="a <toy> cat"), _run(ref, prompt="a <toy> cat"))
    with pytest.raises(ValueError, match="already in the tokenizer"):
        ours.load_textual_inversion({"<toy>": vectors[0]})


# -- single original-layout files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def single_file(sd_folder, tmp_path_factory):
    """Our convert() writes the original layout; the reference's own reader validates it below."""
    from diffusekit.loaders.single_file import convert

    return convert(sd_folder, tmp_path_factory.mktemp("single") / "model.safetensors")


def test_single_file_matches_reference(sd_folder, single_file):
    from safetensors import safe_open

    with safe_open(str(single_file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys

    reference = _run(_load(diffusers, sd_folder))
    ref_single = diffusers.StableDiffusionPipeline.from_single_file(str(single_file), config=str(sd_folder),
                                                                     safety_checker=None)
    ref_single.set_progress_bar_config(disable=True)
    _close(_run(ref_single), reference, tol=1e-6)  # the reference reads our file as the folder's weights

    ours = diffusekit.StableDiffusionPipeline.from_single_file(single_file, config=sd_folder)
    ours.set_progress_bar_config(disable=True)
    assert type(ours.scheduler).__name__ == "DDIMScheduler"
    _close(_run(ours), reference)


def test_single_file_models_ckpt_ema_and_back(sd_folder, single_file, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(single_file))
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    unet = diffusekit.UNet2DConditionModel.from_single_file(single_file, config=sd_folder, subfolder="unet")
    vae = diffusekit.AutoencoderKL.from_single_file(single_file, config=sd_folder / "vae")
    for ours, expected in ((unet, pipe.unet), (vae, pipe.vae)):
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in ours.state_dict().items())

    # a .ckpt (Lightning wrapper) with EMA weights: the EMA copies are used
    ema = {f"model_ema.{''.join(k.split('.')[1:])}": v + 1 for k, v in state.items()
           if k.startswith("model.diffusion_model.")}
    torch.save({"state_dict": {**state, **ema}, "global_step": 10}, tmp_path / "ema.ckpt")
    unet_ema = diffusekit.UNet2DConditionModel.from_single_file(tmp_path / "ema.ckpt", config=sd_folder / "unet")
    assert torch.equal(unet_ema.conv_in.weight, pipe.unet.conv_in.weight + 1)
    unet_raw = diffusekit.UNet2DConditionModel.from_single_file(tmp_path / "ema.ckpt", config=sd_folder / "unet",
                                                                extract_ema=False)
    assert torch.equal(unet_raw.conv_in.weight, pipe.unet.conv_in.weight)

    # single file -> folder -> single file gives the same tensors
    from diffusekit.loaders.single_file import convert

    folder = convert(single_file, tmp_path / "folder", config=sd_folder)
    again = load_file(str(convert(folder, tmp_path / "again.safetensors")))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_single_file_errors_name_the_file(sd_folder, single_file, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(single_file))
    state.pop("model.diffusion_model.out.2.weight")
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(diffusekit.weights.WeightsError, match=r"broken\.safetensors.*out\.2\.weight"):
        diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "broken.safetensors", config=sd_folder)
    import shutil

    no_tokenizer = shutil.copytree(sd_folder, tmp_path / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ValueError, match="tokenizer="):
        diffusekit.StableDiffusionPipeline.from_single_file(single_file, config=no_tokenizer)


def test_flux_transformer_lora_matches_reference():
    """The same LoRA mechanism on FluxTransformer2DModel's Linear layers (``transformer.`` keys,
    scale from ``joint_attention_kwargs``)."""
    from diffusekit.loaders.lora import LoraLoaderMixin
    from diffusekit.pipelines.flux_common import latent_image_ids

    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                  axes_dims_rope=(4, 4, 8))
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**config).eval()
    ours = diffusekit.FluxTransformer2DModel(**config).eval()
    ours.load_checked_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(7)
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2",
               "single_transformer_blocks.0.proj_out", "x_embedder", "context_embedder"]
    state = {}
    for path in targets:
        weight = ours.get_submodule(path).weight
        state[f"transformer.{path}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=gen) * 0.2
        state[f"transformer.{path}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=gen) * 0.2

    class Holder(LoraLoaderMixin):
        transformer = ours

    Holder().load_lora_weights(dict(state), adapter_name="x")
    ref.load_lora_adapter(dict(state), prefix="transformer", adapter_name="x")
    inputs = dict(hidden_states=torch.randn(1, 12, 16, generator=gen),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                  img_ids=latent_image_ids(3, 4), txt_ids=torch.zeros(5, 3))
    with torch.no_grad():
        for options in ({}, {"joint_attention_kwargs": {"scale": 0.3}}):
            _close(ours(**inputs, **options).sample.numpy(), ref(**inputs, **options).sample.numpy(), 1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shipped_configs_map_to_the_original_layout(family):
    """Every parameter of the shipped full-size configs has a unique original name, in the places the
    original SD checkpoints have them (built on the meta device: nothing is allocated)."""
    from diffusekit.loaders import single_file_layout as layout
    from diffusekit.loaders.single_file_model import CONFIG_ROOT, _expected, component_config

    unet_config = component_config("unet", family, None, {"in_channels": 9})
    unet_keys = _expected(diffusekit.UNet2DConditionModel, unet_config)
    names = layout.unet_name_map(unet_config)
    original = {layout.to_original(k, names) for k in unet_keys}
    assert None not in original and len(original) == len(unet_keys)
    assert {"input_blocks.0.0.weight", "input_blocks.3.0.op.weight", "input_blocks.11.0.out_layers.3.weight",
            "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
            "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "out.2.bias"} <= original
    vae_config = component_config("vae", family, None)
    vae_keys = _expected(diffusekit.AutoencoderKL, vae_config)
    vae_names = {layout.to_original(k, layout.vae_name_map(vae_config)) for k in vae_keys}
    assert None not in vae_names and len(vae_names) == len(vae_keys)
    assert {"decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
            "encoder.mid.attn_1.proj_out.weight", "encoder.down.2.downsample.conv.weight"} <= vae_names
    assert (CONFIG_ROOT / family / "scheduler" / "scheduler_config.json").is_file()


def test_openclip_text_encoder_layout_round_trip(sd_folder):
    """SD 2.x files hold the text encoder in OpenCLIP names, q/k/v fused into in_proj."""
    from diffusekit.loaders.single_file import pipeline_to_original, text_encoder_from_single_file

    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    state = pipeline_to_original(pipe, text_encoder_layout="openclip")
    in_proj = state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (96, 32) and "cond_stage_model.model.positional_embedding" in state
    text_encoder = text_encoder_from_single_file(state, pipe.text_encoder.config)
    expected = pipe.text_encoder.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in text_encoder.state_dict().items())
