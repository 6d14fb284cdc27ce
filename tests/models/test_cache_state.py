"""Caching accelerators (models/cache.py): API, exact restore, per-call and per-thread state
(the reference parity is tests/parity/test_cache.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from diffusekit import (
    DeepCacheConfig, FasterCacheConfig, FirstBlockCacheConfig, FluxTransformer2DModel, MagCacheConfig,
    PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, UNet2DConditionModel,
)
from diffusekit.pipelines.flux_common import latent_image_ids
from flux_components import TRANSFORMER_CONFIG, tiny_flux_pipeline
from sd_components import UNET_CONFIG

FLUX_CONFIG = {**TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 2}


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_CONFIG).eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def _flux_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=latent_image_ids(4, 4), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]),
                return_dict=False)


def _unet_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g), return_dict=False)


def _steps(model, inputs: list[dict], context: str | None = "cond") -> list[torch.Tensor]:
    """One model call per input inside ``cache_context(context)``, in a fresh store."""
    model._reset_stateful_cache()
    with torch.no_grad(), model.cache_context(context):
        return [model(**x)[0] for x in inputs]


def test_enable_disable_state_and_errors(flux, unet, caplog):
    assert not flux.is_cache_enabled
    flux.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    assert flux.is_cache_enabled
    with pytest.raises(ValueError, match="Caching has already been enabled"):
        flux.enable_cache(FirstBlockCacheConfig())
    flux.disable_cache()
    assert not flux.is_cache_enabled and "forward" not in flux.transformer_blocks[0].__dict__
    flux.disable_cache()
    assert "nothing to disable" in caplog.text
    with pytest.raises(ValueError, match="Cache config <class 'dict'> is not supported"):
        flux.enable_cache({"threshold": 0.1})
    with pytest.raises(ValueError, match="DeepCacheConfig needs a UNet"):
        flux.enable_cache(DeepCacheConfig())
    with pytest.raises(ValueError, match="is_guidance_distilled=True"):
        flux.enable_cache(FasterCacheConfig())
    with pytest.raises(ValueError, match="tensor_format"):
        flux.enable_cache(FasterCacheConfig(is_guidance_distilled=True, tensor_format="BFHWC"))
    with pytest.raises(ValueError, match="at least 2 blocks"):
        unet.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="not supported by UNet2DConditionModel"):
        unet.enable_cache(FasterCacheConfig(is_guidance_distilled=True))
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 0\]"):
        unet.enable_cache(DeepCacheConfig(cache_branch_id=1))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['step'\\]"):
        with flux.cache_context("cond", step=1):
            pass
    assert not flux.is_cache_enabled and not unet.is_cache_enabled and "forward" not in flux.__dict__


def test_first_block_cache_needs_a_context_and_reuses_residuals(flux):
    inputs = [_flux_inputs(0), {**_flux_inputs(0), "timestep": torch.tensor([0.49])}]
    plain = _steps(flux, inputs)
    flux.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(ValueError, match="no cache context is set"), torch.no_grad():
            flux(**inputs[0])
        cached = _steps(flux, inputs)
        other_context = _steps(flux, inputs[:1], context="uncond")
    finally:
        flux.disable_cache()
    assert torch.equal(cached[0], plain[0]) and torch.equal(other_context[0], plain[0])  # first step: full pass
    assert not torch.allclose(cached[1], plain[1], atol=1e-6)  # second: blocks after the first skipped
    assert all(torch.equal(a, b) for a, b in zip(_steps(flux, inputs), plain))  # disabled: exact


def test_faster_cache_extrapolates_attention_on_skipped_steps(flux):
    inputs = [{**_flux_inputs(0), "timestep": torch.tensor([t])} for t in (0.6, 0.5, 0.4)]
    plain = _steps(flux, inputs, context=None)
    flux.enable_cache(FasterCacheConfig(is_guidance_distilled=True, spatial_attention_timestep_skip_range=(-1, 550)))
    try:
        cached = _steps(flux, inputs, context=None)
    finally:
        flux.disable_cache()
    assert torch.equal(cached[0], plain[0])  # t=600: outside the range, computed
    assert not torch.allclose(cached[1], plain[1], atol=1e-6)  # t=500: iteration 1, attention extrapolated
    assert "forward" not in flux.__dict__ and "forward" not in flux.transformer_blocks[0].attn.__dict__


def test_pyramid_attention_broadcast_reuses_the_last_attention_output(flux):
    inputs = [{**_flux_inputs(0), "timestep": torch.tensor([t])} for t in (0.6, 0.5, 0.4, 0.3)]
    plain = _steps(flux, inputs, context=None)
    flux.enable_cache(PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                      spatial_attention_timestep_skip_range=(-1, 550)))
    try:
        cached = _steps(flux, inputs, context=None)
    finally:
        flux.disable_cache()
    assert torch.equal(cached[0], plain[0])  # t=600: outside the range
    assert not torch.allclose(cached[1], plain[1], atol=1e-6)  # t=500, iteration 1: step 0's attention outputs
    assert torch.equal(cached[2], plain[2])  # iteration 2: due, computed
    assert not torch.allclose(cached[3], plain[3], atol=1e-6)
    assert "forward" not in flux.transformer_blocks[0].attn.__dict__


def test_mag_cache_config_needs_ratios_and_resamples_them():
    with pytest.raises(ValueError, match="`mag_ratios` must be given"):
        MagCacheConfig()
    assert MagCacheConfig(calibrate=True).mag_ratios is None
    config = MagCacheConfig(num_inference_steps=5, mag_ratios=[1.0, 2.0, 3.0])
    assert torch.equal(config.mag_ratios, torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0]))  # nearest (halves to even)
    assert torch.equal(MagCacheConfig(num_inference_steps=1, mag_ratios=[1.0, 2.0]).mag_ratios, torch.tensor([2.0]))


def test_mag_cache_skips_steps_and_restarts_after_the_last_step(flux):
    inputs = [{**_flux_inputs(i), "timestep": torch.tensor([t])} for i, t in enumerate((0.9, 0.8, 0.7))]
    plain = _steps(flux, inputs, context=None)
    flux.enable_cache(MagCacheConfig(num_inference_steps=3, retention_ratio=0.0, threshold=1.0, max_skip_steps=1,
                                     mag_ratios=[1.0, 1.0, 1.0]))
    try:
        cached = _steps(flux, inputs + inputs[:1], context=None)
    finally:
        flux.disable_cache()
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[2], plain[2])  # full steps
    assert not torch.allclose(cached[1], plain[1], atol=1e-6)  # step 1: the last residual reused
    assert torch.equal(cached[3], plain[0])  # after step 3 of 3 the state starts over
    assert "forward" not in flux.transformer_blocks[0].__dict__


def test_mag_cache_calibration_skips_nothing_and_logs_ratios(flux, caplog):
    inputs = [_flux_inputs(0), _flux_inputs(1)]
    plain = _steps(flux, inputs, context=None)
    flux.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=2))
    try:
        with caplog.at_level("INFO", logger="diffusekit.models.cache"):
            cached = _steps(flux, inputs, context=None)
    finally:
        flux.disable_cache()
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))
    assert "MagCache calibration: mag_ratios=[1.0, " in caplog.text


def test_taylorseer_predicts_attention_between_full_steps(flux):
    inputs = [{**_flux_inputs(i), "timestep": torch.tensor([t])} for i, t in enumerate((0.9, 0.8, 0.7, 0.6))]
    plain = _steps(flux, inputs)
    flux.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                            taylor_factors_dtype=torch.float32))
    try:
        with pytest.raises(ValueError, match="no cache context is set"), torch.no_grad():
            flux(**inputs[0])
        cached = _steps(flux, inputs)
    finally:
        flux.disable_cache()
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[1], plain[1])  # warm-up steps
    assert not torch.allclose(cached[2], plain[2], atol=1e-6)  # step 2: predicted from steps 0 and 1
    assert torch.equal(cached[3], plain[3])  # step 3 = before + 1 + interval * k: full again
    assert "forward" not in flux.transformer_blocks[0].attn.__dict__


def test_taylorseer_lite_mode_zeroes_blocks_and_predicts_proj_out(flux):
    flux.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True, disable_cache_before_step=1, cache_interval=5))
    try:
        wrapped = sorted(name for name, m in flux.named_modules() if "forward" in m.__dict__)
        cached = _steps(flux, [_flux_inputs(0), _flux_inputs(1)])
    finally:
        flux.disable_cache()
    assert wrapped == ["proj_out", "single_transformer_blocks.0", "single_transformer_blocks.1",
                       "transformer_blocks.0", "transformer_blocks.1"]
    assert torch.equal(cached[1], cached[0].to(torch.bfloat16).to(cached[0].dtype))  # proj_out's last output


def test_disable_restores_a_forward_that_was_there(unet):
    block = unet.down_blocks[0]
    block.forward = marker = block.forward
    unet.enable_cache(DeepCacheConfig())
    assert block.__dict__["forward"] is not marker
    unet.disable_cache()
    assert block.__dict__.pop("forward") is marker


def test_deep_cache_reuses_deep_levels_between_full_steps(unet):
    inputs = [_unet_inputs(0), {**_unet_inputs(0), "timestep": torch.tensor(450)}, _unet_inputs(1)]
    plain = _steps(unet, inputs)
    unet.enable_cache(DeepCacheConfig(cache_interval=2))
    try:
        cached = _steps(unet, inputs)
        again = _steps(unet, inputs)
    finally:
        unet.disable_cache()
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[2], plain[2])  # steps 0 and 2: full
    assert not torch.allclose(cached[1], plain[1], atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(cached, again))  # a reset store starts clean
    unet.enable_cache(DeepCacheConfig(cache_interval=1))
    try:
        every_step = _steps(unet, inputs)
    finally:
        unet.disable_cache()
    assert all(torch.equal(a, b) for a, b in zip(every_step, plain))


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("clip_tokenizer"), num_layers=2, num_single_layers=2)


def _flux_call(pipe, thread: int) -> torch.Tensor:
    return pipe(prompt=["a red cat", "the blue sky"][thread], guidance_scale=2.0 + thread, num_inference_steps=4,
                height=32, width=32, max_sequence_length=16, output_type="pt",
                generator=torch.Generator().manual_seed(thread)).images


def test_two_threads_with_first_block_cache_match_sequential_calls(flux_pipe):
    uncached = [_flux_call(flux_pipe, i) for i in range(2)]
    flux_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.8))
    try:
        alone = [_flux_call(flux_pipe, i) for i in range(2)]
        barrier, results = threading.Barrier(2), {}

        def work(thread: int) -> None:
            barrier.wait()
            results[thread] = _flux_call(flux_pipe, thread)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        flux_pipe.transformer.disable_cache()
    assert all(torch.equal(results[i], alone[i]) for i in range(2))
    assert any(not torch.allclose(alone[i], uncached[i], atol=1e-6) for i in range(2))  # the cache did skip


def test_deep_cache_in_the_stable_diffusion_pipeline(tmp_path):
    from diffusekit import StableDiffusionPipeline
    from sd_components import save_tiny_sd_folder

    pipe = StableDiffusionPipeline.from_pretrained(save_tiny_sd_folder(tmp_path / "sd", tmp_path / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        return pipe("a cat", num_inference_steps=4, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run()
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=2))
    try:
        cached, again = run(), run()
    finally:
        pipe.unet.disable_cache()
    assert not torch.allclose(cached, plain, atol=1e-6) and torch.equal(cached, again)  # each call starts clean
    assert torch.equal(run(), plain)
