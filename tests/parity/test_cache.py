"""Cached FLUX outputs match the reference's with the same cache config (models/cache.py)."""

import diffusers
import numpy as np
import pytest
import torch

import diffusekit
from flux_components import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, tiny_t5, tiny_t5_tokenizer
from sd_components import tiny_text_encoder, tiny_tokenizer

RUN = dict(prompt="a red cat", max_sequence_length=16, num_inference_steps=5, height=32, width=32,
           guidance_scale=3.5, output_type="np")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The reference's tiny FluxPipeline (2 double + 2 single blocks), saved, loaded in both."""
    folder = tmp_path_factory.mktemp("flux_cache")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 2})
    diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=diffusers.AutoencoderKL(**VAE_CONFIG),
        text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, text_encoder_2=tiny_t5(len(tokenizer_2)),
        tokenizer_2=tokenizer_2, transformer=transformer,
    ).save_pretrained(folder)
    loaded = []
    for lib in (diffusekit, diffusers):
        pipe = lib.FluxPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        loaded.append(pipe)
    return loaded


def _run(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), **{**RUN, **kwargs}).images


def _cached(pipe, config, **kwargs):
    pipe.transformer.enable_cache(config)
    try:
        return _run(pipe, **kwargs)
    finally:
        pipe.transformer.disable_cache()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("threshold", [0.3, 0.8])
def test_first_block_cache_matches_reference(pipes, threshold):
    ours, ref = pipes
    plain = _run(ours)
    out = _cached(ours, diffusekit.FirstBlockCacheConfig(threshold=threshold))
    assert _max_diff(out, _cached(ref, diffusers.FirstBlockCacheConfig(threshold=threshold))) <= 1e-4
    assert _max_diff(out, plain) > 1e-3  # some steps were really skipped
    assert _max_diff(_run(ours), plain) == 0.0  # disabled: exactly the uncached output


def test_first_block_cache_with_true_cfg_matches_reference(pipes):
    """cond and uncond keep separate states (cache_context "cond" / "uncond")."""
    ours, ref = pipes
    options = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    out = _cached(ours, diffusekit.FirstBlockCacheConfig(threshold=0.5), **options)
    assert _max_diff(out, _cached(ref, diffusers.FirstBlockCacheConfig(threshold=0.5), **options)) <= 1e-4


def test_faster_cache_matches_reference(pipes):
    """FLUX is guidance-distilled: attention outputs are extrapolated on skipped steps. Ours reads the
    timestep the transformer gets; the reference's needs the pipeline's current timestep."""
    ours, ref = pipes
    options = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
                   attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True)
    out = _cached(ours, diffusekit.FasterCacheConfig(**options))
    expected = _cached(ref, diffusers.FasterCacheConfig(**options,
                                                        current_timestep_callback=lambda: ref.current_timestep))
    assert _max_diff(out, expected) <= 1e-4
    assert _max_diff(out, _run(ours)) > 1e-3


def test_mag_cache_matches_reference(pipes):
    """Steps 1, 2 and 4 of 5 reuse the residual (retention step 1, at most 2 skips in a row)."""
    ours, ref = pipes
    options = dict(num_inference_steps=5, retention_ratio=0.2, threshold=0.5, max_skip_steps=2,
                   mag_ratios=[1.0, 1.05, 1.1, 0.95, 0.9])
    out = _cached(ours, diffusekit.MagCacheConfig(**options))
    assert _max_diff(out, _cached(ref, diffusers.MagCacheConfig(**options))) <= 1e-4
    assert _max_diff(out, _run(ours)) > 1e-3


@pytest.mark.parametrize("options", [
    dict(cache_interval=2, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32),
    dict(cache_interval=3, disable_cache_before_step=1, max_order=2, taylor_factors_dtype=torch.bfloat16),
    dict(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True),
], ids=["order1-fp32", "order2-bf16", "lite"])
def test_taylorseer_cache_matches_reference(pipes, options):
    ours, ref = pipes
    out = _cached(ours, diffusekit.TaylorSeerCacheConfig(**options))
    assert _max_diff(out, _cached(ref, diffusers.TaylorSeerCacheConfig(**options))) <= 1e-4
    assert _max_diff(out, _run(ours)) > 1e-3


def test_pyramid_attention_broadcast_matches_reference(pipes):
    ours, ref = pipes
    options = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 900),
                   spatial_attention_block_identifiers=["transformer_blocks"])
    out = _cached(ours, diffusekit.PyramidAttentionBroadcastConfig(**options))
    expected = _cached(ref, diffusers.PyramidAttentionBroadcastConfig(
        **options, current_timestep_callback=lambda: ref.current_timestep))
    assert _max_diff(out, expected) <= 1e-4
    assert _max_diff(out, _run(ours)) > 1e-3
