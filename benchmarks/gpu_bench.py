"""Denoising loops at real sizes on CUDA: reference (diffusers) and diffusekit, eager and compiled.

    python benchmarks/gpu_bench.py                 # (or benchmarks/gpu.sh) CUDA, real sizes, < 8 minutes
    python benchmarks/gpu_bench.py --dry-run       # CPU, tiny sizes, 2 steps, the "eager" compile backend
    python benchmarks/gpu_bench.py --only flux     # some cases: sd15, sdxl, flux

Cases: SD 1.5 (512x512, 50 steps, guided, batch 1 and 8, fp16), SDXL (1024x1024, 30 steps, guided,
batch 1, fp16), FLUX.1-dev size (1024x1024, 28 steps, guidance-distilled, batch 1, bf16). Random
weights at the real sizes: the reference model is built on the GPU and diffusekit's takes the same
tensors (shared, counted once in peak VRAM). The loop is the same code for both libraries (each
with its own denoiser and Euler / flow-match Euler scheduler); text encoding and VAE decoding are
left out (the same work in both, not compiled). "Compiled" is regional compilation for both:
``compile_repeated_blocks`` for the reference, ``compile_denoiser`` (what ``pipe.compile`` calls)
for diffusekit, ``fullgraph=True, dynamic=False``. "Whole-step" is diffusekit's
``pipe.compile(whole_step=True)`` path (``pipelines/whole_step.py``): guidance doubling, input
scaling, the denoiser, guidance and the scheduler update as one graph (with ``--mode
reduce-overhead``, one CUDA graph per step), the denoiser itself left eager.

Columns: compile = first compiled step minus a compiled step (printed apart from the timed run),
total = the timed loop, step = total / steps, peak = torch.cuda.max_memory_allocated during the
timed loop (weights included), floor = total / (FLOPs per step x steps / peak FLOP/s); FLOPs per
step are counted with torch.utils.flop_counter on one eager step (matmuls, convolutions,
attention); the peak is --peak-tflops or the dense fp16/bf16 tensor-core figure of the GPU found.
diff = max |latents - ours eager latents| at the end of the loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))

#: Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}
VARIANTS = ("reference eager", "reference compiled", "ours eager", "ours compiled", "ours whole-step")
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8))


@dataclass
class Case:
    """One benchmark: denoiser class name and config, inputs, and the loop's settings."""

    label: str
    model_class: str
    config: dict
    steps: int
    batch: int
    dtype: torch.dtype
    guidance: float | None  # classifier-free guidance scale, None for FLUX's distilled guidance
    latent_shape: tuple[int, ...]  # per image
    text_shape: tuple[int, int]
    scheduler: str
    extra: dict = field(default_factory=dict)  # "sdxl": added conditions; "flux": ids, pooled width


def cases(dry_run: bool) -> list[Case]:
    from run import SD15_UNET, SDXL_UNET

    half = torch.float32 if dry_run else torch.float16
    bf16 = torch.float32 if dry_run else torch.bfloat16
    steps = (lambda n: 2) if dry_run else (lambda n: n)
    sd15 = dict(TINY_UNET, cross_attention_dim=32) if dry_run else SD15_UNET
    sdxl = dict(TINY_UNET, cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8) if dry_run else SDXL_UNET
    flux = TINY_FLUX if dry_run else {"guidance_embeds": True}  # FluxTransformer2DModel's defaults: FLUX.1 size
    sd_latent, xl_latent, flux_tokens = (8, 8, 16) if dry_run else (64, 128, 4096)
    sd_text, xl_text, flux_text = ((7, 32), (7, 32), (5, 32)) if dry_run else ((77, 768), (77, 2048), (512, 4096))
    return [
        *(Case(f"SD1.5 512px {steps(50)} steps batch {b}", "UNet2DConditionModel", sd15, steps(50), b, half, 7.5,
               (4, sd_latent, sd_latent), sd_text, "EulerDiscreteScheduler") for b in (1, 8)),
        Case(f"SDXL 1024px {steps(30)} steps batch 1", "UNet2DConditionModel", sdxl, steps(30), 1, half, 5.0,
             (4, xl_latent, xl_latent), xl_text, "EulerDiscreteScheduler",
             {"sdxl": (32 if dry_run else 1280, 8 if dry_run else 1024)}),
        Case(f"FLUX.1-dev 1024px {steps(28)} steps batch 1", "FluxTransformer2DModel", flux, steps(28), 1, bf16, None,
             (flux_tokens, 64), flux_text, "FlowMatchEulerDiscreteScheduler",
             {"flux": 32 if dry_run else 768}),
    ]


def build_models(case: Case, device: str):
    """(reference, ours): random weights, ours sharing the reference's tensors."""
    import diffusers

    import diffusekit
    from diffusekit.models.layers import building_for_load

    diffusers.utils.logging.set_verbosity_error()  # its dtype-cast notes on every .to()

    torch.manual_seed(0)
    with torch.device(device):
        reference = getattr(diffusers, case.model_class)(**case.config).to(case.dtype).eval()
    with building_for_load("meta"):
        ours = getattr(diffusekit, case.model_class)(**case.config).eval()
    ours.load_state_dict(reference.state_dict(), assign=True)
    return reference, ours


def step_inputs(case: Case, device: str) -> dict:
    """The per-loop conditioning (text states and the model's extras), seeded, for the guided batch."""
    gen = torch.Generator(device).manual_seed(1)
    rows = case.batch * (2 if case.guidance is not None else 1)
    make = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(case.dtype)  # noqa: E731
    inputs = {"encoder_hidden_states": make(rows, *case.text_shape)}
    if "sdxl" in case.extra:
        pooled, size = case.extra["sdxl"]
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=case.dtype).repeat(rows, 1)
        inputs["added_cond_kwargs"] = {"text_embeds": make(rows, pooled), "time_ids": time_ids}
    if "flux" in case.extra:
        tokens = case.latent_shape[0]
        side = int(tokens**0.5)
        ids = torch.zeros(side, side, 3, device=device)
        ids[..., 1] += torch.arange(side, device=device)[:, None]
        ids[..., 2] += torch.arange(side, device=device)[None, :]
        inputs.update(pooled_projections=make(rows, case.extra["flux"]), img_ids=ids.reshape(tokens, 3),
                      txt_ids=torch.zeros(case.text_shape[0], 3, device=device),
                      guidance=torch.full((rows,), 3.5, device=device, dtype=case.dtype))
    return inputs


def denoiser_call(model, case: Case, inputs: dict) -> Callable:
    """``f(latents, t) -> prediction``, the way each pipeline calls its denoiser."""
    if "flux" in case.extra:
        return lambda x, t: model(hidden_states=x, timestep=(t.expand(x.shape[0]) / 1000).to(x.dtype),
                                  return_dict=False, **inputs)[0]
    return lambda x, t: model(x, t, return_dict=False, **inputs)[0]


def make_scheduler(library, case: Case):
    if case.scheduler == "FlowMatchEulerDiscreteScheduler":
        return library.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return library.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          timestep_spacing="leading", steps_offset=1)


def denoise(predict: Callable, scheduler, case: Case, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """The sampling loop: guidance doubling, scaling, the denoiser, guidance, the scheduler step."""
    scheduler.set_timesteps(case.steps, device=latents.device)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps[:steps]:
        x = torch.cat([latents] * 2) if case.guidance is not None else latents
        if hasattr(scheduler, "scale_model_input"):
            x = scheduler.scale_model_input(x, t)
        out = predict(x, t)
        if case.guidance is not None:
            uncond, cond = out.chunk(2)
            out = uncond + case.guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
    return latents


def whole_step_loop(model, case: Case, inputs: dict, backend: str, mode: str | None) -> Callable:
    """``loop(noise, steps) -> latents`` through diffusekit's compiled whole step (one compile, kept
    across calls); the same work as :func:`denoise` with diffusekit's scheduler."""
    from types import SimpleNamespace

    import diffusekit
    from diffusekit.pipelines import whole_step
    from diffusekit.pipelines.flux_common import flux_prediction

    compiled = whole_step.WholeStep(dict(backend=backend, mode=mode, fullgraph=True, dynamic=False))
    if "flux" in case.extra:
        predict, scalars = flux_prediction, {}
        step_inputs = dict(guidance=inputs["guidance"], prompt_embeds=inputs["encoder_hidden_states"],
                           pooled_prompt_embeds=inputs["pooled_projections"], text_ids=inputs["txt_ids"],
                           image_ids=inputs["img_ids"])
    else:
        predict, scalars = whole_step.sd_prediction, {"guidance_scale": case.guidance}
        options = {k: v for k, v in inputs.items() if k != "encoder_hidden_states"}
        step_inputs = dict(prompt_embeds=inputs["encoder_hidden_states"], guided=True, guidance_rescale=0.0,
                           options=options)

    def loop(noise: torch.Tensor, steps: int) -> torch.Tensor:
        scheduler = make_scheduler(diffusekit, case)
        scheduler.set_timesteps(case.steps, device=noise.device)
        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        state = SimpleNamespace(scheduler=scheduler, lora_scale=None)
        call = compiled.plan_call(state, model, latents, {})
        for t in scheduler.timesteps[:steps]:
            latents = call.step(state, model, predict, latents, t, step_inputs, scalars)
        return latents

    return loop


def compile_model(model, library: str, backend: str, mode: str | None) -> None:
    settings = dict(backend=backend, mode=mode, fullgraph=True, dynamic=False)
    if library == "diffusers":
        model.compile_repeated_blocks(**settings)
    else:
        from diffusekit.pipelines.compile import compile_denoiser

        compile_denoiser(model, regional=True, **settings)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> tuple[float, torch.Tensor, float]:
    """(seconds, result, peak MB) of one call."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return seconds, result, peak


def flops_per_step(predict: Callable, case: Case, latents: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.cat([latents] * 2) if case.guidance is not None else latents
    with FlopCounterMode(display=False) as counter:
        predict(x, torch.tensor(500.0, device=latents.device))
    return float(counter.get_total_flops())


@torch.no_grad()
def run_case(case: Case, device: str, backend: str, mode: str | None, peak_flops: float,
             variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    import diffusers

    import diffusekit

    models = dict(zip(("reference", "ours"), build_models(case, device)))
    libraries = {"reference": diffusers, "ours": diffusekit}
    inputs = step_inputs(case, device)
    noise = torch.randn(case.batch, *case.latent_shape, generator=torch.Generator(device).manual_seed(2),
                        device=device).to(case.dtype)
    flops = flops_per_step(denoiser_call(models["ours"], case, inputs), case, noise)
    rows, finals = [], {}
    for variant in ("ours eager", *(v for v in variants if v != "ours eager")):  # the diffs' reference first
        side, kind = variant.split()
        model = models[side]
        predict = denoiser_call(model, case, inputs)
        loop = lambda steps: denoise(predict, make_scheduler(libraries[side], case), case, noise, steps)  # noqa: E731
        if kind == "whole-step":
            from diffusekit.pipelines.compile import reset_compiled

            torch._dynamo.reset()
            reset_compiled(model)
            whole = whole_step_loop(model, case, inputs, backend, mode)
            loop = lambda steps: whole(noise, steps)  # noqa: E731
        elif kind == "compiled":
            torch._dynamo.reset()
            compile_model(model, "diffusers" if side == "reference" else "diffusekit", backend, mode)
        first, _, _ = timed(lambda: loop(1), device)  # warm-up; compiles when compiled
        total, finals[variant], peak = timed(lambda: loop(case.steps), device)
        step = total / case.steps
        rows.append(dict(case=case.label, variant=variant, compile_s=first - step if kind != "eager" else 0.0,
                         step_ms=step * 1000, total_s=total, peak_mb=peak,
                         floor=total / (flops * case.steps / peak_flops)))
    for row in rows:
        row["diff"] = float((finals[row["variant"]].float() - finals["ours eager"].float()).abs().max())
    rows = sorted((row for row in rows if row["variant"] in variants), key=lambda row: VARIANTS.index(row["variant"]))
    del models
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def peak_tflops(device: str, given: float | None) -> tuple[float, str]:
    if given is not None:
        return given, "--peak-tflops"
    if device != "cuda":
        return 1.0, "nominal 1 TFLOP/s (dry run)"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"{name}, dense fp16/bf16 tensor cores"
    raise ValueError(f"unknown GPU {name!r}: pass --peak-tflops (its dense fp16/bf16 peak)")


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':<36} {'variant':<19} {'compile s':>9} {'step ms':>9} {'total s':>8} {'peak MB':>9} "
              f"{'x floor':>8} {'max diff':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<36} {r['variant']:<19} {r['compile_s']:9.1f} {r['step_ms']:9.2f} {r['total_s']:8.2f} "
              f"{r['peak_mb']:9.0f} {r['floor']:8.2f} {r['diff']:9.2e}", flush=True)


CASE_PREFIXES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX"}


def run_cases(only: list[str], dry_run: bool = False, backend: str | None = None, mode: str | None = None,
              tflops: float | None = None, variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """The table's rows for the cases named in ``only`` (keys of :data:`CASE_PREFIXES`)."""
    unknown = sorted(set(only) - set(CASE_PREFIXES))
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {', '.join(CASE_PREFIXES)}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry-run for the CPU check")
    if dry_run:
        torch.set_num_threads(1)  # tiny models: threads only add start-up costs
    backend = backend or ("eager" if dry_run else "inductor")
    peak, source = peak_tflops(device, tflops)
    print(f"device {device}, backend {backend}, mode {mode}, peak {peak:g} TFLOP/s ({source}), "
          f"torch {torch.__version__}", flush=True)
    chosen = tuple(CASE_PREFIXES[name] for name in only)
    return [row for case in cases(dry_run) if case.label.startswith(chosen)
            for row in run_case(case, device, backend, mode, peak * 1e12, variants)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 steps, eager backend")
    parser.add_argument("--only", default="sd15,sdxl,flux", help="comma-separated: sd15, sdxl, flux")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor; eager in a dry run)")
    parser.add_argument("--mode", default=None, help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak for the floor ratio")
    args = parser.parse_args(argv)
    try:
        rows = run_cases(args.only.split(","), args.dry_run, args.backend, args.mode, args.peak_tflops,
                         tuple(args.variants.split(",")))
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    print_table(rows)

if __name__ == "__main__":
    main()
