"""FLUX.1 LoRAs in the original model's names (kohya ``lora_unet_double_blocks_...`` and BFL
``diffusion_model.double_blocks...``) against the reference's FluxPipeline.load_lora_weights."""

import copy

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusekit
from diffusekit.pipelines.flux_common import latent_image_ids
from sd_components import tiny_text_encoder, tiny_tokenizer
from test_flux import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, tiny_t5, tiny_t5_tokenizer

pytest.importorskip("peft")  # the reference's LoRA backend

TOL = 1e-4
RUN = dict(prompt="a red cat", max_sequence_length=16, num_inference_steps=2, height=32, width=32, output_type="np")
#: BFL module name -> the diffusers layers it covers (for the tensor shapes only)
DOUBLE = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn.proj": ["attn.to_out.0"],
          "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"], "img_mod.lin": ["norm1.linear"],
          "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "txt_attn.proj": ["attn.to_add_out"], "txt_mlp.0": ["ff_context.net.0.proj"],
          "txt_mlp.2": ["ff_context.net.2"], "txt_mod.lin": ["norm1_context.linear"]}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
          "modulation.lin": ["norm.linear"]}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
       "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
       "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
CLIP_TARGETS = ["text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.1.mlp.fc2"]


def bfl_modules(transformer, linear1: bool = True, blocks: bool = True, top: bool = True) -> dict[str, list[str]]:
    """BFL module name -> diffusers layer paths, for every block of ``transformer`` and the top-level layers."""
    out = {}
    for i in range(len(transformer.transformer_blocks) if blocks else 0):
        out.update({f"double_blocks.{i}.{k}": [f"transformer_blocks.{i}.{p}" for p in v] for k, v in DOUBLE.items()})
    for i in range(len(transformer.single_transformer_blocks) if blocks else 0):
        out.update({f"single_blocks.{i}.{k}": [f"single_transformer_blocks.{i}.{p}" for p in v]
                    for k, v in SINGLE.items() if linear1 or k != "linear1"})
    out.update({k: [v] for k, v in TOP.items() if top and _has(transformer, v)})
    return out


def _has(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def flux_lora(transformer, text_encoder=None, layout="kohya", seed=0, rank=4, spelling="A", **which):
    """A random LoRA in ``layout`` ("kohya" or "bfl"; ``spelling`` "A" (lora_A/B) or "down" (lora_down/up)
    for bfl). alpha = rank / 2 except on final_layer keys (the reference ignores those alphas)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {k: [transformer.get_submodule(p) for p in v] for k, v in bfl_modules(transformer, **which).items()}
    modules.update({f"clip:{p}": [text_encoder.get_submodule(p.removeprefix("text_model."))]
                    for p in (CLIP_TARGETS if text_encoder is not None else [])})
    down_name, up_name = ("lora_A", "lora_B") if layout == "bfl" and spelling == "A" else ("lora_down", "lora_up")
    state = {}
    for name, layers in modules.items():
        clip = name.startswith("clip:")
        name = name.removeprefix("clip:")
        if layout == "kohya":
            key = ("lora_te1_" if clip else "lora_unet_") + name.replace(".", "_")
        else:
            key = ("text_encoders.clip_l.transformer." if clip else "diffusion_model.") + name
        rows = sum(layer.out_features for layer in layers)
        state[f"{key}.{down_name}.weight"] = torch.randn(rank, layers[0].in_features, generator=gen) * 0.2
        state[f"{key}.{up_name}.weight"] = torch.randn(rows, rank, generator=gen) * 0.2
        if not name.startswith("final_layer"):
            state[f"{key}.alpha"] = torch.tensor(rank / 2)
    return state


def as_comfy(state):
    """The same LoRA spelt ``lora_down`` / ``lora_up`` (the BFL spelling the reference reads)."""
    return {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in state.items()}


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(0)
    diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=diffusers.AutoencoderKL(**VAE_CONFIG),
        text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, text_encoder_2=tiny_t5(len(tokenizer_2)),
        tokenizer_2=tokenizer_2, transformer=diffusers.FluxTransformer2DModel(**TRANSFORMER_CONFIG),
    ).save_pretrained(folder)
    return folder


@pytest.fixture()
def pipes(flux_folder):
    pair = diffusekit.FluxPipeline.from_pretrained(flux_folder), diffusers.FluxPipeline.from_pretrained(flux_folder)
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    return pair


def _run(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), **RUN, **kwargs).images


def _close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
def test_pipeline_lora_matches_reference_scaled_fused_and_unloads_exactly(pipes, layout, tmp_path):
    """Every block layer but single blocks' linear1 (the reference splits that one by FLUX.1-dev's fixed
    sizes; see the full-width test below), and CLIP MLP layers. Top-level layers: see the next test."""
    ours, ref = pipes
    base = _run(ours)
    state = flux_lora(ours.transformer, ours.text_encoder, layout, seed=1, linear1=False, top=False)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    ours.load_lora_weights(str(path), adapter_name="style")
    # the reference silently skips BFL files spelt lora_A/lora_B; it reads the lora_down/lora_up spelling.
    # (It also scales kohya text-encoder tensors in place: it gets a copy.)
    ref.load_lora_weights(copy.deepcopy(as_comfy(state) if layout == "bfl" else state), adapter_name="style")
    assert ours.get_list_adapters() == {"transformer": ["style"], "text_encoder": ["style"]}

    with_lora = _run(ours)
    assert np.abs(with_lora - base).max() > 1e-2
    _close(with_lora, _run(ref))
    half = {"joint_attention_kwargs": {"scale": 0.5}}
    _close(_run(ours, **half), _run(ref, **half))
    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=1.0)
    _close(_run(ours), _run(ref))
    ours.unfuse_lora()
    _close(_run(ours), with_lora, tol=1e-6)

    ours.unload_lora_weights()
    assert np.array_equal(_run(ours), base)
    if layout == "bfl":  # both spellings load the same adapter
        ours.load_lora_weights(as_comfy(state))
        _close(_run(ours), with_lora, tol=1e-6)


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
def test_top_level_layers_match_reference_given_the_diffusers_layout(pipes, layout):
    """img_in, txt_in, time/vector/guidance_in and final_layer (its modulation's up rows swapped: BFL
    emits shift, scale). The reference converts these keys without their ``transformer.`` prefix and
    so silently drops them; here they apply, and match the reference loading the same LoRA written
    in the diffusers layout."""
    ours, ref = pipes
    state = flux_lora(ours.transformer, layout=layout, seed=7, blocks=False)
    down_name = "lora_A" if layout == "bfl" else "lora_down"
    peft = {}
    for bfl, path in TOP.items():
        key = f"diffusion_model.{bfl}" if layout == "bfl" else "lora_unet_" + bfl.replace(".", "_")
        if f"{key}.{down_name}.weight" not in state:
            continue
        up = state[f"{key}.{down_name.replace('A', 'B').replace('down', 'up')}.weight"]
        if path == "norm_out.linear":
            up = torch.cat(up.chunk(2)[::-1])
        scale = 0.5 if f"{key}.alpha" in state else 1.0  # alpha / rank
        peft[f"transformer.{path}.lora_A.weight"] = state[f"{key}.{down_name}.weight"] * scale
        peft[f"transformer.{path}.lora_B.weight"] = up
    assert len(peft) == 2 * len(TOP)  # the tiny model has guidance_in
    ours.load_lora_weights(state)
    ref.load_lora_weights(peft)
    _close(_run(ours), _run(ref))


def test_fused_linear1_at_any_width_equals_split_peft_layout(pipes):
    """kohya ``linear1`` (q, k, v and MLP rows) cut by the model's own sizes (here 32, 32, 32, 128)."""
    ours, _ = pipes
    state = {k: v for k, v in flux_lora(ours.transformer, layout="kohya", seed=2).items() if "linear1" in k}
    down = state["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    block = ours.transformer.single_transformer_blocks[0]
    sizes = [block.attn.to_q.out_features] * 3 + [block.proj_mlp.out_features]
    peft = {}
    for name, part in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], up.split(sizes)):
        peft[f"transformer.single_transformer_blocks.0.{name}.lora_A.weight"] = down * 0.5  # alpha / rank
        peft[f"transformer.single_transformer_blocks.0.{name}.lora_B.weight"] = part
    ours.load_lora_weights(state)
    kohya = _run(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights(peft)
    _close(_run(ours), kohya, tol=1e-6)


def test_keys_that_match_no_layer_are_listed(pipes):
    ours, _ = pipes
    state = flux_lora(ours.transformer, layout="kohya", seed=3)
    state["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight"] = torch.zeros(96, 4)
    state["lora_unet_double_blocks_0_img_norm.lora_down.weight"] = torch.zeros(4, 32)
    with pytest.raises(diffusekit.weights.WeightsError, match="double_blocks_7_img_attn_qkv.*double_blocks_0_img_norm|"
                                                              "double_blocks_0_img_norm.*double_blocks_7_img_attn_qkv"):
        ours.load_lora_weights(state)
    assert ours.get_list_adapters() == {}
    bfl = {"diffusion_model.double_blocks.0.img_attn.bogus.lora_A.weight": torch.zeros(4, 32),
           "diffusion_model.double_blocks.0.img_attn.bogus.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(diffusekit.weights.WeightsError, match=r"double_blocks\.0\.img_attn\.bogus"):
        ours.load_lora_weights({**flux_lora(ours.transformer, layout="bfl", seed=3), **bfl})
    bad_rows = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 32),
                "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(100, 4)}
    with pytest.raises(ValueError, match="single_blocks_0_linear1.*100 rows"):
        ours.load_lora_weights(bad_rows)


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
def test_linear1_at_flux_width_matches_reference(layout):
    """One single block at FLUX.1's width (3072, MLP 12288), where the reference's fixed split applies."""
    config = dict(patch_size=1, in_channels=16, num_layers=0, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                  axes_dims_rope=(16, 56, 56))
    torch.manual_seed(0)
    ref_model = diffusers.FluxTransformer2DModel(**config).eval()
    ours_model = diffusekit.FluxTransformer2DModel(**config).eval()
    ours_model.load_checked_state_dict({k: v.clone() for k, v in ref_model.state_dict().items()})
    empty = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    ours = diffusekit.FluxPipeline(**empty, transformer=ours_model)
    ref = diffusers.FluxPipeline(**empty, transformer=ref_model)
    state = {k: v for k, v in flux_lora(ours_model, layout=layout, seed=4).items()
             if "single_blocks_0_linear" in k.replace(".", "_")}
    gen = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, generator=gen),
                  encoder_hidden_states=torch.randn(1, 3, 32, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                  img_ids=latent_image_ids(2, 2), txt_ids=torch.zeros(3, 3))

    def both(**options):
        with torch.no_grad():
            return ours_model(**inputs, **options).sample.numpy(), ref_model(**inputs, **options).sample.numpy()

    base = both()[0]
    ours.load_lora_weights(dict(state))
    ref.load_lora_weights(copy.deepcopy(as_comfy(state) if layout == "bfl" else state))
    loaded = both()
    assert np.abs(loaded[0] - base).max() > 1e-2
    _close(*loaded)
    _close(*both(joint_attention_kwargs={"scale": 0.5}))
    for pipe in (ours, ref):
        pipe.fuse_lora()
    _close(*both())
    ours.unfuse_lora()
    ours.unload_lora_weights()
    assert np.array_equal(both()[0], base)
