"""LoRA and textual inversion on SDXL's three models against the reference's SDXL pipeline:
kohya files in the original SGM UNet names and in diffusers names (``lora_unet_``, ``lora_te1_``,
``lora_te2_``), peft files (``unet.``, ``text_encoder.``, ``text_encoder_2.``); loaded, scaled, fused,
unfused and unloaded exactly. A1111 SDXL embeddings (``clip_l`` / ``clip_g``)."""

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdxl_loader_parts import save_reference_sdxl
from diffusekit import StableDiffusionXLImg2ImgPipeline

pytest.importorskip("peft")  # the reference's LoRA backend

#: (our module path, its original SGM path) in the tiny base UNet (layers_per_block=2, two blocks)
UNET_TARGETS = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k", "input_blocks.5.1.transformer_blocks.1.attn2.to_k"),
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0.transformer_blocks.1.ff.net.2", "middle_block.1.transformer_blocks.1.ff.net.2"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
     "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0"),
    ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
    ("add_embedding.linear_1", "label_emb.0.0"),
]
TE_TARGETS = {"text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"],
              "text_encoder_2": ["text_model.encoder.layers.1.self_attn.v_proj", "text_model.encoder.layers.0.mlp.fc1"]}
KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_reference_sdxl(tmp_path_factory.mktemp("sdxl") / "base")


def _tensors(pipe, rank: int = 2) -> dict:
    """{(component, our path, original path or None): (down, up)}, random and fixed (alpha = rank)."""
    gen = torch.Generator().manual_seed(3)
    targets = [("unet", ours, original) for ours, original in UNET_TARGETS]
    targets += [(component, path, None) for component, paths in TE_TARGETS.items() for path in paths]
    result = {}
    for component, path, original in targets:
        model = getattr(pipe, component)  # this transformers has no text_model wrapper: file names keep it
        weight = model.get_submodule(path if hasattr(model, "text_model") else path.removeprefix("text_model.")).weight
        down = torch.randn(rank, *weight.shape[1:], generator=gen) * 0.3
        up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=gen) * 0.3
        result[component, path, original] = (down, up)
    return result


def _file(tensors: dict, layout: str, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """The LoRA state dict in ``layout``: "peft", "kohya" (diffusers names) or "kohya_sgm" (original UNet names)."""
    state = {}
    for (component, path, original), (down, up) in tensors.items():
        if layout == "peft":
            state[f"{component}.{path}.lora_A.weight"], state[f"{component}.{path}.lora_B.weight"] = down, up
            continue
        name = original if layout == "kohya_sgm" and original else path
        prefix = "lora_unet_" if component == "unet" else KOHYA_TE[component]
        key = prefix + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def _reference_reads(tensors: dict, layout: str) -> dict:
    """The targets the reference loads from ``layout``: its kohya reader drops text-encoder attention
    (``self_attn_q_proj`` is renamed to a key its text encoders lack) and ``add_embedding_linear_1``
    in diffusers names (only the SGM ``label_emb_0_0`` reaches the layer)."""
    def kept(component, path):
        if layout != "peft" and component != "unet" and "self_attn" in path:
            return False
        return not (layout == "kohya" and path.startswith("add_embedding"))

    return {key: value for key, value in tensors.items() if kept(key[0], key[1])}


def _inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(sample=torch.randn(1, 4, 8, 8, generator=gen), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(1, 5, 64, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=gen),
                                   "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])})


def _outputs(pipe, **unet_options) -> list[np.ndarray]:
    ids = torch.tensor([[520, 70, 80, 90, 100, 521, 521]])
    with torch.no_grad():
        unet = pipe.unet(**_inputs(), **unet_options).sample
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
    return [t.numpy() for t in (unet, first, second.hidden_states[-2], second.text_embeds)]


def _close(ours: list, ref: list, tol: float = 1e-5) -> None:
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and np.abs(a - b).max() <= tol, np.abs(a - b).max()


def _states(pipe) -> dict:
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder", "text_encoder_2")}


@pytest.mark.parametrize("layout", ["peft", "kohya", "kohya_sgm"])
def test_lora_matches_reference_scaled_fused_and_unloads_exactly(base_folder, layout, tmp_path):
    ours = StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder)
    before, before_outputs = _states(ours), _outputs(ours)
    path = tmp_path / "lora.safetensors"
    save_file(_file(_reference_reads(_tensors(ours), layout), layout, alpha=1.5), str(path))
    ours.load_lora_weights(path, adapter_name="style")
    ref.load_lora_weights(str(path), adapter_name="style")
    assert ours.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"], "text_encoder_2": ["style"]}
    loaded = _outputs(ours)
    _close(loaded, _outputs(ref))
    assert not np.allclose(loaded[0], before_outputs[0])  # the LoRA does change every model
    assert all(not np.allclose(a, b) for a, b in zip(loaded[1:], before_outputs[1:]))
    scaled = {"cross_attention_kwargs": {"scale": 0.5}}
    _close(_outputs(ours, **scaled)[:1], _outputs(ref, **scaled)[:1])

    ours.fuse_lora(lora_scale=0.7)
    ref.fuse_lora(lora_scale=0.7)
    _close(_outputs(ours), _outputs(ref))
    ours.unfuse_lora()
    ref.unfuse_lora()
    _close(_outputs(ours), loaded, tol=0)

    ours.unload_lora_weights()
    after = _states(ours)
    assert all(torch.equal(after[m][k], before[m][k]) for m in before for k in before[m])
    _close(_outputs(ours), before_outputs, tol=0)


@pytest.mark.parametrize("layout", ["kohya", "kohya_sgm"])
def test_kohya_layouts_equal_the_peft_layout_on_every_target(base_folder, layout):
    """Including what the reference's kohya reader drops (text-encoder attention, add_embedding in
    diffusers names): here every key applies, as the same LoRA in the peft layout."""
    tensors = _tensors(StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder))
    kohya, peft = StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder), StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder)
    kohya.load_lora_weights(_file(tensors, layout))
    peft.load_lora_weights(_file(tensors, "peft"))
    _close(_outputs(kohya), _outputs(peft), tol=0)


# -- textual inversion ---------------------------------------------------------------------------


def _encode(pipe, prompt: str) -> list[np.ndarray]:
    outputs = []
    for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(pipe.maybe_convert_prompt(prompt, tokenizer), padding="max_length", max_length=12,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            outputs.append(text_encoder(ids, output_hidden_states=True).hidden_states[-2].numpy())
    return outputs


def test_sdxl_embedding_file_loads_into_both_encoders_as_the_reference(base_folder, tmp_path):
    """An A1111 SDXL file (clip_l, clip_g; 2 vectors each) in one call; the reference needs one call
    per encoder with the entry and the pair given explicitly, which diffusekit takes as well."""
    gen = torch.Generator().manual_seed(9)
    path = tmp_path / "sdxltoy.safetensors"
    save_file({"clip_l": torch.randn(2, 24, generator=gen), "clip_g": torch.randn(2, 40, generator=gen)}, str(path))
    from safetensors.torch import load_file

    state = load_file(str(path))
    ours, explicit = StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder), StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder)
    ours.load_textual_inversion(path)
    for pipe in (ref, explicit):
        pipe.load_textual_inversion(state["clip_l"], token="sdxltoy", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="sdxltoy", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    prompt = "the sdxltoy cat"
    assert ours.maybe_convert_prompt(prompt, ours.tokenizer_2) == "the sdxltoy sdxltoy_1 cat"
    expected = _encode(ref, prompt)
    _close(_encode(ours, prompt), expected, tol=0)
    _close(_encode(explicit, prompt), expected, tol=0)
    row = ours.tokenizer_2.convert_tokens_to_ids("sdxltoy_1")
    assert torch.equal(ours.text_encoder_2.get_input_embeddings().weight[row], state["clip_g"][1])

    # the whole file with one pair given: the entry as wide as that text encoder
    one = StableDiffusionXLImg2ImgPipeline.from_pretrained(base_folder)
    one.load_textual_inversion(path, text_encoder=one.text_encoder_2, tokenizer=one.tokenizer_2)
    assert "sdxltoy" in one.tokenizer_2.get_vocab() and "sdxltoy" not in one.tokenizer.get_vocab()
    _close(_encode(one, prompt)[1:], expected[1:], tol=0)
