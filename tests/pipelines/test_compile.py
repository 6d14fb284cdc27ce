"""pipe.compile: no graph breaks in the tiny UNet / FLUX transformer, compiled == eager, no recompiles
across same-shape calls, scheduler swaps and LoRA unloads, and a sampling loop that never reads the
latents back to the host. Compiles use the fast "eager"/"aot_eager" backends (one inductor check)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from diffusekit import EulerDiscreteScheduler, FluxTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusekit.pipelines.compile import (compile_denoiser, find_denoiser, float_timestep, repeated_blocks,
                                          reset_compiled)
from flux_components import TRANSFORMER_CONFIG
from helpers import guarded, plain
from lora_files import lora_tensors, peft_layout
from sd_components import UNET_CONFIG


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def pipe(parts):
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    unet.load_state_dict(parts["unet"].state_dict())  # a copy: compiling and LoRA change the module
    pipe = StableDiffusionPipeline(**{**parts, "unet": unet}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.unload_lora_weights()  # the text encoder is shared by the module's tests


def _sample(pipe, **kwargs):
    options = dict(num_inference_steps=2, height=32, width=32, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    return pipe("a photo of a cat", **{**options, **kwargs}).images


def unet_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor(10)), dict(
        encoder_hidden_states=torch.randn(2, 7, 32, generator=gen))


def flux_inputs():
    gen = torch.Generator().manual_seed(0)
    return (), dict(hidden_states=torch.randn(1, 16, 16, generator=gen),
                    encoder_hidden_states=torch.randn(1, 5, 32, generator=gen),
                    pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]))


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


MODELS = {"unet": (tiny_unet, unet_inputs), "flux": (tiny_flux, flux_inputs)}


def model_and_call(kind: str):
    """A tiny denoiser, its forward on fixed inputs as a callable, and its eager output."""
    build, inputs = MODELS[kind]
    model = build()
    args, kwargs = inputs()

    def call() -> torch.Tensor:
        return model(*args, **kwargs).sample

    return model, call, call()


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_whole_forward_is_one_graph_and_matches_eager(kind):
    """fullgraph=False, so a graph break would show as a second graph instead of an error."""
    model, call, eager = model_and_call(kind)
    keys = list(model.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compile_denoiser(model, regional=False, backend=counter, fullgraph=False)
    torch.testing.assert_close(call(), eager, atol=1e-4, rtol=0)
    assert counter.frame_count == 1 and list(model.state_dict()) == keys
    reset_compiled(model)
    assert "forward" not in model.__dict__ and torch.equal(call(), eager)


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_regional_compile_shares_one_graph_per_block_class(kind):
    model, call, eager = model_and_call(kind)
    counter = CompileCounterWithBackend("aot_eager")
    compile_denoiser(model, backend=counter)
    torch.testing.assert_close(call(), eager, atol=1e-4, rtol=0)
    blocks = repeated_blocks(model)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert counter.frame_count == len({type(b) for b in blocks})  # the tiny models' blocks of a class share shapes


def test_no_recompiles_across_calls_scheduler_swap_and_lora_unload(pipe):
    counter = CompileCounter()
    pipe.compile(regional=False, backend=counter)
    ddim, eager_free = pipe.scheduler, _sample(pipe)
    _sample(pipe)
    assert counter.frame_count == 1
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # float timesteps, not int
    _sample(pipe)
    assert counter.frame_count == 1
    pipe.scheduler = ddim

    pipe.load_lora_weights(peft_layout(lora_tensors(pipe, seed=1)), adapter_name="a")
    with_lora = _sample(pipe)
    assert counter.frame_count == 2  # the LoRA layers are new code: compiled once
    _sample(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(_sample(pipe), eager_free)
    assert counter.frame_count == 2 and not torch.equal(with_lora, eager_free)


def test_compiled_lora_matches_eager_lora(pipe):
    pipe.load_lora_weights(peft_layout(lora_tensors(pipe, seed=1)), adapter_name="a")
    eager = _sample(pipe)
    pipe.compile(regional=True, backend="aot_eager")
    torch.testing.assert_close(_sample(pipe), eager, atol=1e-4, rtol=0)


def test_compiled_model_refuses_lora_call_scales(pipe):
    pipe.load_lora_weights(peft_layout(lora_tensors(pipe, seed=1)), adapter_name="a")
    pipe.compile(backend="eager")
    with pytest.raises(ValueError, match=r"LoRA call scale \(0.5\) needs an eager UNet2DConditionModel"):
        _sample(pipe, cross_attention_kwargs={"scale": 0.5})
    assert _sample(pipe, cross_attention_kwargs={"scale": 1.0}).shape == (1, 4, 16, 16)


def test_sampling_loop_never_reads_the_latents_back(pipe):
    """What a CUDA graph of a whole step needs: after the scheduler's setup, nothing in the loop
    (guidance, scheduler step, UNet) moves the latents' values to the host."""
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    for scheduler in (pipe.scheduler, EulerDiscreteScheduler.from_config(pipe.scheduler.config)):
        pipe.scheduler = scheduler
        out = _sample(pipe, latents=guarded(latents), num_inference_steps=3)
        assert torch.isfinite(plain(out)).all()


def test_fuse_qkv_is_undone_by_unfuse(pipe):
    keys = list(pipe.unet.state_dict())
    before = _sample(pipe)
    pipe.compile(backend="eager", fuse_qkv=True)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.weight" in pipe.unet.state_dict()
    torch.testing.assert_close(_sample(pipe), before, atol=1e-5, rtol=0)
    pipe.unet.unfuse_qkv_projections()
    assert list(pipe.unet.state_dict()) == keys


def test_compile_argument_errors(pipe):
    with pytest.raises(ValueError, match="either mode or options"):
        pipe.compile(mode="reduce-overhead", options={"triton.cudagraphs": True})
    with pytest.raises(ValueError, match="StableDiffusionPipeline has no denoiser to compile"):
        find_denoiser(StableDiffusionPipeline.__new__(StableDiffusionPipeline))
    with pytest.raises(ValueError, match=r"Sequential has no repeated blocks .*use regional=False"):
        repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_float_timestep_gives_the_graph_float32_tensors():
    seen = []

    def forward(sample, timestep, encoder_hidden_states=None):
        seen.append(timestep)

    wrapped = float_timestep(forward, forward)
    sample = torch.zeros(1)
    wrapped(sample, 10)
    wrapped(sample, torch.tensor(10))
    wrapped(sample, timestep=torch.tensor([2.5], dtype=torch.float16))
    assert [(t.dtype, t.tolist()) for t in seen] == [(torch.float32, 10.0), (torch.float32, 10.0),
                                                     (torch.float16, [2.5])]
    assert float_timestep(plain, plain) is plain  # nothing to convert without a timestep argument


def test_find_denoiser_takes_the_unet_or_the_transformer():
    transformer = torch.nn.Linear(1, 1)
    assert find_denoiser(SimpleNamespace(unet=None, transformer=transformer)) is transformer


def _sdxl_pipe(tmp_path):
    from diffusekit import AutoencoderKL, StableDiffusionXLPipeline
    from sdxl_pipeline_parts import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoders, tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp_path)
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    return StableDiffusionXLPipeline(vae=AutoencoderKL(**VAE_CONFIG).eval(), text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=UNet2DConditionModel(**UNET_CONFIG).eval(),
                                     scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))


def _flux_pipe(tmp_path):
    from diffusekit import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from flux_components import SCHEDULER_CONFIG, VAE_CONFIG, tiny_t5, tiny_t5_tokenizer
    from sd_components import tiny_text_encoder, tiny_tokenizer

    tokenizer, tokenizer_2 = tiny_tokenizer(tmp_path), tiny_t5_tokenizer()
    torch.manual_seed(0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                        vae=AutoencoderKL(**VAE_CONFIG).eval(), text_encoder=tiny_text_encoder(tokenizer),
                        tokenizer=tokenizer, text_encoder_2=tiny_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2,
                        transformer=tiny_flux())


@pytest.mark.parametrize("build, options", [(_sdxl_pipe, {}), (_flux_pipe, {"max_sequence_length": 16})],
                         ids=["sdxl", "flux"])
def test_sdxl_and_flux_pipelines_compile_to_one_graph(build, options, tmp_path):
    pipe = build(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    eager = _sample(pipe, **options)
    counter = CompileCounterWithBackend("eager")
    assert pipe.compile(regional=False, backend=counter) is find_denoiser(pipe)
    torch.testing.assert_close(_sample(pipe, **options), eager, atol=1e-5, rtol=0)
    assert counter.frame_count == 1  # one graph, kept across the steps
