"""FLUX.1 text-to-image and image-to-image against the reference, on tiny random parts the
reference saves (transformer, FLUX-style VAE, CLIP and T5 text encoders and tokenizers)."""

import json
import time

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit.pipelines.flux_common import calculate_shift, latent_image_ids, pack_latents, unpack_latents
from flux_components import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, tiny_t5, tiny_t5_tokenizer
from sd_components import tiny_text_encoder, tiny_tokenizer

TOL = 1e-4
SHORT = dict(max_sequence_length=16, num_inference_steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A reference FluxPipeline on tiny random parts, saved."""
    folder = tmp_path_factory.mktemp("flux")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
        text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, text_encoder_2=tiny_t5(len(tokenizer_2)),
        tokenizer_2=tokenizer_2, transformer=transformer,
    ).save_pretrained(folder)
    return folder


def _load(lib, name, folder):
    pipe = getattr(lib, name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(flux_folder):
    return _load(diffusekit, "FluxPipeline", flux_folder), _load(diffusers, "FluxPipeline", flux_folder)


@pytest.fixture(scope="module")
def img2img_pipes(pipes):
    ours, ref = pipes
    pair = diffusekit.FluxImg2ImgPipeline(**ours.components), diffusers.FluxImg2ImgPipeline(**ref.components)
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    return pair


def _run(pipe, seed=0, **kwargs):
    kwargs = {**SHORT, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def _close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()


# -- text-to-image ------------------------------------------------------------------------------


def test_distilled_guidance(pipes):
    ours, ref = pipes
    out = _run(ours, prompt="a red cat", guidance_scale=3.5)
    assert out.shape == (1, 32, 32, 3)
    _close(out, _run(ref, prompt="a red cat", guidance_scale=3.5))
    assert not np.allclose(out, _run(ours, prompt="a red cat", guidance_scale=1.0), atol=1e-3)


def test_true_cfg_negative_prompt_several_images_non_square(pipes):
    ours, ref = pipes
    kwargs = dict(prompt=["a red cat", "the dog"], prompt_2=["a photo of a cat", "blue sky"],
                  negative_prompt="blurry", true_cfg_scale=4.0, num_images_per_prompt=2, height=32, width=48)
    out = _run(ours, **kwargs)
    assert out.shape == (4, 32, 48, 3)
    _close(out, _run(ref, **{**kwargs, "negative_prompt": ["blurry", "blurry"]}))
    single = dict(prompt="the cat", negative_prompt="ugly", negative_prompt_2="a blurry painting", true_cfg_scale=2.5)
    _close(_run(ours, **single), _run(ref, **single))


def test_generator_list_latents_output_types_and_callback(pipes):
    ours, ref = pipes
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    kwargs = dict(prompt="the dog", num_images_per_prompt=2, **SHORT)
    _close(ours(generator=gens(), output_type="np", **kwargs).images,
           ref(generator=gens(), output_type="np", **kwargs).images)
    latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(3))
    for output_type in ("pt", "latent"):
        a = ours(prompt="a cat", latents=latents, output_type=output_type, **SHORT).images
        b = ref(prompt="a cat", latents=latents, output_type=output_type, **SHORT).images
        assert isinstance(a, torch.Tensor) and a.shape == (b.shape if output_type == "latent" else (1, 3, 32, 32))
        _close(a, b)
    pil = _run(ours, prompt="a dog", output_type="pil")
    assert isinstance(pil[0], Image.Image)
    np.testing.assert_array_equal(np.asarray(pil[0]), np.asarray(_run(ref, prompt="a dog", output_type="pil")[0]))

    seen = []

    def halve(pipe, step, t, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5}

    options = dict(prompt="a cat", callback_on_step_end=halve,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    out = _run(ours, **options)
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    _close(out, _run(ref, **options))


def test_prompt_embeds_and_custom_sigmas(pipes):
    ours, ref = pipes
    with torch.no_grad():
        embeds, pooled, text_ids = ours.encode_prompt("a red cat", max_sequence_length=16)
        ref_embeds, ref_pooled, ref_ids = ref.encode_prompt("a red cat", prompt_2=None, max_sequence_length=16)
    assert embeds.shape == (1, 16, 32) and pooled.shape == (1, 32) and text_ids.shape == (16, 3)
    _close(embeds, ref_embeds, 1e-6)
    _close(pooled, ref_pooled, 1e-6)
    _close(text_ids, ref_ids, 0)
    kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, sigmas=[1.0, 0.6], max_sequence_length=16)
    _close(_run(ours, **kwargs), _run(ref, **kwargs))


def test_input_errors(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours(prompt="a cat", max_sequence_length=513)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="prompt or prompt_embeds"):
        ours(prompt="a cat", prompt_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="output_type"):
        ours(prompt="a cat", output_type="jpeg", **SHORT)
    with pytest.raises(ValueError, match="negative_prompt holds 1"):
        ours(prompt=["a", "b"], negative_prompt=["c"], true_cfg_scale=2.0, **SHORT)


def test_t5_truncation_is_reported(pipes, caplog):
    ours, _ = pipes
    with caplog.at_level("WARNING"):
        ours(prompt="a red cat and a blue dog", **{**SHORT, "max_sequence_length": 4, "num_inference_steps": 1},
             output_type="latent")
    assert any("T5" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


# -- image-to-image -----------------------------------------------------------------------------


def test_image_to_image(img2img_pipes):
    ours, ref = img2img_pipes
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    kwargs = dict(prompt="a blue cat", image=image, strength=0.6, guidance_scale=5.0)
    out = _run(ours, **kwargs)
    assert out.shape == (1, 32, 32, 3)
    _close(out, _run(ref, **kwargs))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5)]  # noqa: E731
    kwargs = dict(prompt="a dog", image=image, strength=0.9, num_images_per_prompt=2, negative_prompt="ugly",
                  true_cfg_scale=3.0, output_type="np", num_inference_steps=3, height=32, width=48,
                  max_sequence_length=16)
    out = ours(generator=gens(), **kwargs).images
    assert out.shape == (2, 32, 48, 3)
    _close(out, ref(generator=gens(), **kwargs).images)
    with pytest.raises(ValueError, match="strength"):
        ours(prompt="a", image=image, strength=0.0, **SHORT)


# -- saving, helpers, transformer -----------------------------------------------------------------


def test_our_save_loads_in_reference(pipes, tmp_path):
    ours, _ = pipes
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    reloaded = _load(diffusers, "FluxPipeline", tmp_path)
    _close(_run(ours, prompt="the cat"), _run(reloaded, prompt="the cat"))
    assert type(diffusekit.DiffusionPipeline.from_pretrained(tmp_path)) is diffusekit.FluxPipeline


def test_packing_ids_and_shift_match_reference():
    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, diffusers.FluxPipeline._pack_latents(latents, 2, 4, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), latents, rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(3, 4),
                               diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as reference_shift

    assert calculate_shift(1024) == pytest.approx(reference_shift(1024), abs=1e-12)


def _transformer_inputs(config, image_tokens=(4, 6), text_tokens=5, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image_tokens
    return dict(
        hidden_states=torch.randn(batch, h * w, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g), img_ids=latent_image_ids(h, w), txt_ids=torch.zeros(text_tokens, 3),
        guidance=torch.full((batch,), 3.5) if config["guidance_embeds"] else None,
    )


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_transformer_matches_reference_and_fuses(guidance_embeds):
    config = {**TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": guidance_embeds}
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**config).eval()
    ours = diffusekit.FluxTransformer2DModel(**config).eval()
    ours.load_checked_state_dict(ref.state_dict())
    inputs = _transformer_inputs(config)
    with torch.no_grad():
        expected = ref(**inputs).sample
        _close(ours(**inputs).sample, expected, 1e-5)
        ours.fuse_qkv_projections()
        _close(ours(**inputs, return_dict=False)[0], expected, 1e-5)
        ours.unfuse_qkv_projections()
    assert not any("qkv" in k for k in ours.state_dict())
    with pytest.raises(ValueError, match="guidance"):
        ours(**{**inputs, "guidance": None if guidance_embeds else torch.ones(2)})
    keep = torch.ones(2, 1, 1, 5 + 24, dtype=torch.bool)
    keep[0, ..., 3:5] = False  # the first sample ignores its last two text tokens
    options = dict(joint_attention_kwargs={"attention_mask": keep, "scale": 0.5})
    with torch.no_grad():
        masked = ours(**inputs, **options).sample
        _close(masked, ref(**inputs, **options).sample, 1e-5)
    assert not torch.allclose(masked[0], expected[0]) and torch.allclose(masked[1], expected[1], atol=1e-6)


def test_transformer_gradient_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = diffusekit.FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    inputs = _transformer_inputs(TRANSFORMER_CONFIG)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(**inputs).sample.square().mean().backward()
        grads.append(model.x_embedder.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_flux_dev_width_transformer_matches_reference(all_threads):
    """FLUX.1-dev widths (24 heads of 128, T5 4096, CLIP 768, guidance, axes 16/56/56), 2 + 2 blocks,
    16x16 image tokens and 8 text tokens."""
    config = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    start = time.perf_counter()
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**config).eval()
    with torch.device("meta"):
        ours = diffusekit.FluxTransformer2DModel(**config)
    ours.load_checked_state_dict(ref.state_dict())  # shares the reference's tensors
    inputs = _transformer_inputs(config, image_tokens=(16, 16), text_tokens=8, batch=1)
    with torch.no_grad():
        expected = ref(**inputs).sample
        out = ours(**inputs).sample
    assert out.shape == (1, 256, 64)
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    print(f"FLUX.1-dev-width transformer parity: {time.perf_counter() - start:.1f} s")
