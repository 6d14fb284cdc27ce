"""Side-by-side benchmarks against the reference (diffusers), in one run, printed as ratios.

    make bench                                        # everything that this machine can run
    python benchmarks/run.py --only import,scheduler  # some sections
    python benchmarks/run.py --threads 1              # steadier on a busy shared machine

Sections: import (fresh processes: time and peak RSS), scheduler (step and set_timesteps on a
2x4x64x64 latent), unet (DDIM sampling with tiny UNet2DModels at 32x32 and 64x64), tiny_sd (the
parity tests' tiny Stable Diffusion pipeline, equal output checked), sd15_load (from_pretrained of
an SD 1.5-size fp16 pipeline with random weights, saved by the reference: ~2 GB under --cache),
cold_start (import + from_pretrained in fresh processes, taken in turn: the SD 1.5-size pipeline
and a reduced-width FLUX.1-architecture pipeline in bf16, ~1 GB more under --cache),
sdxl_load (the same for an SDXL-size base pipeline: ~7 GB), sdxl_unet_parity (the real SDXL base
UNet config in float32, one CPU forward against the reference: ~10 GB of RAM, a few minutes), and,
only where CUDA is available, gpu (benchmarks/gpu_bench.py's denoising loops, also run alone by
benchmarks/gpu.sh: SD 1.5 512x512 50 steps batch 1 and 8, SDXL 1024x1024 30 steps, FLUX.1-dev size
1024x1024 28 steps; eager and compiled) and gpu_sdxl_unet (one SDXL-size UNet forward). Peak memory is measured
in fresh processes (RSS) or with torch.cuda.max_memory_allocated (VRAM).

Ours and the reference run alternately in the same process; figures are medians. Ratios are
diffusekit / reference: below 1.0 means diffusekit is faster or smaller. Results go to
bench-results.json (--out).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

RESULTS: dict[str, dict] = {}


def record(name: str, ours: float, reference: float, unit: str = "s", **extra) -> None:
    ratio = ours / reference if reference else float("nan")
    RESULTS[name] = {"diffusekit": ours, "reference": reference, "ratio": ratio, "unit": unit, **extra}
    print(f"{name:<44} diffusekit {ours:10.4f} {unit}   reference {reference:10.4f} {unit}   ratio {ratio:6.3f}")


def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` untimed ones."""
    return timed_pair(fn, None, repeat, warmup)[0]


def timed_pair(ours, reference, repeat: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median wall times of two callables, run alternately (the machine is shared: noise hits both)."""
    fns = [fn for fn in (ours, reference) if fn is not None]
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times):
            gc.collect()
            start = time.perf_counter()
            result = fn()
            bucket.append(time.perf_counter() - start)
            del result  # freeing what a run built is not part of its time
    medians = [statistics.median(t) for t in times]
    return medians[0], (medians[1] if len(medians) > 1 else float("nan"))


# -- import ----------------------------------------------------------------------------------------

# Peak RSS from VmHWM: on Linux ru_maxrss survives exec, so a child would report this (torch-laden)
# process's peak instead of its own.
_IMPORT_PROBE = """
import sys, time
start = time.perf_counter()
{stmt}
elapsed = time.perf_counter() - start
try:
    peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
except OSError:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(elapsed, peak, 'transformers' in sys.modules)
"""


def import_probe(stmt: str) -> tuple[float, float, bool]:
    runs = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(stmt=stmt)], capture_output=True,
                             text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds, megabytes, transformers = out.stdout.split()
        runs.append((float(seconds), float(megabytes), transformers == "True"))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2]


def bench_import() -> None:
    for label, ours, ref in [
        ("import package", "import diffusekit", "import diffusers"),
        ("import StableDiffusionPipeline", "from diffusekit import StableDiffusionPipeline",
         "from diffusers import StableDiffusionPipeline"),
    ]:
        t_ours, mb_ours, tf_ours = import_probe(ours)
        t_ref, mb_ref, _ = import_probe(ref)
        record(f"{label} (time)", t_ours, t_ref, transformers_imported=tf_ours)
        record(f"{label} (peak RSS)", mb_ours, mb_ref, unit="MB")


# -- schedulers ------------------------------------------------------------------------------------

SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


def bench_scheduler() -> None:
    """Per scheduler: ``scale_model_input`` + ``step`` on a 2x4x64x64 latent (30 steps, per step),
    and ``set_timesteps(30)`` on its own."""
    import diffusers

    import diffusekit

    sample = torch.randn(2, 4, 64, 64)
    steps = 30
    for name in SCHEDULERS:
        loops, setups = [], []
        for lib in (diffusekit, diffusers):
            scheduler = getattr(lib, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            takes_generator = "generator" in inspect.signature(scheduler.step).parameters

            def loop(scheduler=scheduler, takes_generator=takes_generator) -> None:
                scheduler.set_timesteps(steps)
                x = sample
                extra = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
                for t in scheduler.timesteps:
                    model_input = scheduler.scale_model_input(x, t)
                    x = scheduler.step(0.1 * model_input, t, x, **extra).prev_sample

            loops.append(loop)
            setups.append(lambda scheduler=scheduler: scheduler.set_timesteps(steps))
        setup = timed_pair(*setups, repeat=7)
        total = timed_pair(*loops, repeat=5)
        per_step = [(total[i] - setup[i]) / steps * 1e3 for i in range(2)]
        record(f"scheduler step {name}", *per_step, unit="ms")
        record(f"scheduler set_timesteps {name}", setup[0] * 1e3, setup[1] * 1e3, unit="ms")


# -- peak memory of a run in a fresh process -------------------------------------------------------

_MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
import run
torch.set_num_threads({threads})
run.{function}({library!r}, {argument!r})
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)
"""


def peak_rss(function: str, argument: str) -> tuple[float, float]:
    """Peak RSS (MB) of a fresh process running ``function(library, argument)``, ours then the reference."""
    if not os.path.exists("/proc/self/status"):
        return float("nan"), float("nan")
    peaks = []
    for library in ("diffusekit", "diffusers"):
        code = _MEMORY_PROBE.format(bench_dir=str(Path(__file__).resolve().parent), threads=torch.get_num_threads(),
                                    function=function, library=library, argument=argument)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peaks.append(float(out.stdout.split()[-1]))
    return peaks[0], peaks[1]


def _library(name: str):
    import importlib

    return importlib.import_module(name)


# -- pixel UNet sampling ---------------------------------------------------------------------------

def _tiny_unet_folder(root: Path, size: int) -> Path:
    import diffusers

    folder = root / f"ddpm-{size}"
    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                     block_out_channels=(32, 64), norm_num_groups=8,
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(folder)
    return folder


def sample_unet(library: str, folder: str):
    pipe = _library(library).DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def bench_unet_sampling(root: Path) -> None:
    import diffusers

    import diffusekit

    for size in (32, 64):
        folder = _tiny_unet_folder(root, size)
        runs = []
        for lib in (diffusekit, diffusers):
            pipe = lib.DDIMPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)

            def run(pipe=pipe):
                return pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                            output_type="np").images

            runs.append(run)
        diff = float(abs(runs[0]() - runs[1]()).max())
        name = f"DDIM sampling UNet2DModel {size}x{size} (batch 2, 10 steps)"
        record(name, *timed_pair(*runs, repeat=5), max_abs_diff=diff)
        record(f"{name} peak RSS", *peak_rss("sample_unet", str(folder)), unit="MB")


# -- Stable Diffusion ------------------------------------------------------------------------------

def _tiny_sd_folder(root: Path) -> Path:
    """The parity tests' tiny Stable Diffusion pipeline (tests/sd_components.py), saved by the reference."""
    import diffusers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer

    folder = root / "tiny-sd"
    if (folder / "model_index.json").exists():
        return folder
    tokenizer = tiny_tokenizer(root / "tiny-sd-tokenizer")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def _tiny_sd_call(pipe):
    return pipe("a photo of a cat", num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def sample_tiny_sd(library: str, folder: str):
    pipe = _library(library).StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return _tiny_sd_call(pipe)


def bench_tiny_sd(root: Path) -> None:
    import diffusers

    import diffusekit

    folder = _tiny_sd_folder(root)
    runs = []
    for lib in (diffusekit, diffusers):
        pipe = lib.StableDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        runs.append(lambda pipe=pipe: _tiny_sd_call(pipe))
    diff = float(abs(runs[0]() - runs[1]()).max())
    name = "tiny SD pipeline sampling (64x64, 10 steps, CFG)"
    record(name, *timed_pair(*runs, repeat=7), max_abs_diff=diff)
    record(f"{name} peak RSS", *peak_rss("sample_tiny_sd", str(folder)), unit="MB")


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def _sd15_folder(root: Path) -> Path:
    """An SD 1.5-size pipeline with random weights in float16, saved by the reference (~2 GB)."""
    import diffusers
    import transformers

    folder = root / "sd15-random-fp16"
    if (folder / "model_index.json").exists():
        return folder
    tiny = _tiny_sd_folder(root)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET).half()
    vae = diffusers.AutoencoderKL(**SD15_VAE).half()
    text_config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                              projection_dim=768)
    text_encoder = transformers.CLIPTextModel(text_config).half()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.PNDMScheduler.from_pretrained(tiny / "scheduler"),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def load_sd15(library: str, folder: str):
    return _library(library).StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)


def bench_fp16_load(label: str, folder: Path, loader: str, repeat: int) -> None:
    """``from_pretrained`` time (best of ``repeat``, side by side) and fresh-process peak RSS of ``loader``."""
    load = globals()[loader]
    loads = [lambda lib=lib: load(lib, str(folder)) for lib in ("diffusekit", "diffusers")]
    record(f"from_pretrained {label} fp16", *timed_pair(*loads, repeat=repeat))
    record(f"from_pretrained {label} fp16 peak RSS", *peak_rss(loader, str(folder)), unit="MB")


def bench_sd15_load(root: Path) -> None:
    bench_fp16_load("SD 1.5-size", _sd15_folder(root), "load_sd15", repeat=7)


FLUX_SMALL_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                              num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=768,
                              guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611, sample_size=1024)


def _flux_small_folder(root: Path) -> Path:
    """The FLUX.1 architecture at reduced width and depth (transformer dim 1024, 2 + 4 blocks; T5 with
    d_model 1024, 6 layers; full CLIP-L text encoder and FLUX VAE), bfloat16, saved by the reference."""
    import diffusers
    import transformers

    folder = root / "flux-small-bf16"
    if (folder / "model_index.json").exists():
        return folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from flux_components import tiny_t5_tokenizer

    tiny = _tiny_sd_folder(root)
    torch.manual_seed(0)
    text_config = transformers.CLIPTextConfig(**CLIP_L)
    t5_config = transformers.T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=6, num_heads=16,
                                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    pipe = diffusers.FluxPipeline(
        transformer=diffusers.FluxTransformer2DModel(**FLUX_SMALL_TRANSFORMER).to(torch.bfloat16),
        vae=diffusers.AutoencoderKL(**FLUX_VAE).to(torch.bfloat16),
        text_encoder=transformers.CLIPTextModel(text_config).to(torch.bfloat16),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tiny / "tokenizer"),
        text_encoder_2=transformers.T5EncoderModel(t5_config).to(torch.bfloat16),
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    pipe.save_pretrained(folder)
    return folder


SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")


def _sdxl_folder(root: Path) -> Path:
    """An SDXL-size base pipeline with random weights in float16, saved by the reference (~7 GB).
    Built with float16 as the default dtype, one component at a time (peak ~5 GB, not 14)."""
    import diffusers
    import transformers

    folder = root / "sdxl-random-fp16"
    if (folder / "model_index.json").exists():
        return folder
    tiny = _tiny_sd_folder(root)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        parts = dict(vae=diffusers.AutoencoderKL(**SDXL_VAE),
                     text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)),
                     text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_BIG_G)),
                     unet=diffusers.UNet2DConditionModel(**SDXL_UNET))
    finally:
        torch.set_default_dtype(default)
    pipe = diffusers.StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                               scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


_COLD_START = ("import torch; torch.set_num_threads(1); from {library} import {pipeline}; "
               "{pipeline}.from_pretrained({folder!r}, torch_dtype=torch.{dtype})")


def cold_pair(ours: str, reference: str, runs: int = 5) -> tuple[tuple[float, float], tuple[float, float]]:
    """(median time, median peak RSS) of two statements, each run in fresh interpreters taken in turn."""
    results: list[list[tuple[float, float]]] = [[], []]
    for _ in range(runs):
        for i, stmt in enumerate((ours, reference)):
            out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(stmt=stmt)], capture_output=True,
                                 text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            seconds, megabytes, _ = out.stdout.split()[-3:]
            results[i].append((float(seconds), float(megabytes)))
    medians = [(statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for rs in results]
    return medians[0], medians[1]


def bench_cold_start(root: Path) -> None:
    """Import + from_pretrained in a fresh process: SD 1.5 size (fp16) and the reduced FLUX (bf16)."""
    for label, pipeline, folder, dtype in [
        ("SD 1.5-size fp16", "StableDiffusionPipeline", _sd15_folder(root), "float16"),
        ("FLUX-architecture reduced bf16", "FluxPipeline", _flux_small_folder(root), "bfloat16"),
    ]:
        stmts = [_COLD_START.format(library=lib, pipeline=pipeline, folder=str(folder), dtype=dtype)
                 for lib in ("diffusekit", "diffusers")]
        (t_ours, mb_ours), (t_ref, mb_ref) = cold_pair(*stmts)
        record(f"import + from_pretrained {label} (fresh process)", t_ours, t_ref)
        record(f"import + from_pretrained {label} peak RSS", mb_ours, mb_ref, unit="MB")

def load_sdxl(library: str, folder: str):
    return _library(library).StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16)


def bench_sdxl_load(root: Path) -> None:
    bench_fp16_load("SDXL-size", _sdxl_folder(root), "load_sdxl", repeat=3)


def bench_sdxl_unet_parity(root: Path) -> None:
    """The real SDXL base UNet config with random float32 weights (~10 GB, shared by both models),
    one CPU forward at 32x32 latents; fails above 1e-4 relative difference."""
    import diffusers

    import diffusekit
    from diffusekit.models.layers import building_for_load

    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**SDXL_UNET).eval()
    with building_for_load("meta"):
        ours = diffusekit.UNet2DConditionModel(**SDXL_UNET).eval()
    ours.load_state_dict(reference.state_dict(), assign=True)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 2048, generator=generator)
    added = {"text_embeds": torch.randn(1, 1280, generator=generator),
             "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])}
    outputs, times = [], []
    with torch.no_grad():
        for model in (ours, reference):
            start = time.perf_counter()
            outputs.append(model(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample)
            times.append(time.perf_counter() - start)
    relative = float((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max())
    record("SDXL base UNet fp32 forward 32x32 latents (CPU)", *times, max_rel_diff=relative)
    if relative > 1e-4:
        raise RuntimeError(f"SDXL UNet differs from the reference by {relative:.2e} (relative), above 1e-4")


# -- GPU -------------------------------------------------------------------------------------------

def _cuda_timed_pair(ours, reference, repeat: int = 3) -> tuple[float, float, float, float]:
    """Median times and peak allocated VRAM (MB) of two CUDA callables, run alternately."""
    times: list[list[float]] = [[], []]
    peaks = [0.0, 0.0]
    for fn in (ours, reference):
        fn()  # warm-up (and compilation)
    for _ in range(repeat):
        for i, fn in enumerate((ours, reference)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
            peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated() / 2**20)
    return statistics.median(times[0]), statistics.median(times[1]), peaks[0], peaks[1]


def bench_gpu(root: Path) -> None:
    """benchmarks/gpu_bench.py's denoising loops (SD 1.5 batch 1 and 8, SDXL, FLUX.1-dev size; eager and
    compiled), recorded as ours / reference pairs."""
    import gpu_bench

    rows = {(r["case"], r["variant"]): r for r in gpu_bench.run_cases(list(gpu_bench.CASE_PREFIXES))}
    for case, variant in rows:
        side, kind = variant.split()
        if side != "ours":
            continue
        ours, reference = rows[case, variant], rows[case, f"reference {kind}"]
        record(f"GPU {case} ({kind})", ours["total_s"], reference["total_s"], max_abs_diff=ours["diff"],
               compile_s=ours["compile_s"], reference_compile_s=reference["compile_s"], x_floor=ours["floor"])
        record(f"GPU {case} ({kind}) peak VRAM", ours["peak_mb"], reference["peak_mb"], unit="MB")


def bench_gpu_sdxl_unet(root: Path) -> None:
    """One SDXL-size UNet forward (random fp16 weights, 1024x1024 latents, batch 2 = one guided image)."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    import diffusers

    import diffusekit

    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: ~10 GB of float32 weights each before .half()
        reference = diffusers.UNet2DConditionModel(**SDXL_UNET).half().eval()
        ours = diffusekit.UNet2DConditionModel(**SDXL_UNET).half().eval()
    ours.load_state_dict(reference.state_dict())
    sample = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
    text = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
    added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=torch.float16)}
    for mode in ("eager", "compile"):
        models = [ours, reference] if mode == "eager" else [torch.compile(ours), torch.compile(reference)]

        @torch.no_grad()
        def forward(model):
            return model(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample

        runs = [lambda m=m: forward(m) for m in models]
        diff = float((runs[0]() - runs[1]()).abs().max())
        t_ours, t_ref, vram_ours, vram_ref = _cuda_timed_pair(*runs, repeat=10)
        record(f"GPU SDXL-size UNet forward fp16 batch 2 ({mode})", t_ours, t_ref, max_abs_diff=diff)
        record(f"GPU SDXL-size UNet forward fp16 batch 2 ({mode}) peak VRAM", vram_ours, vram_ref, unit="MB")


SECTIONS = {
    "import": lambda root: bench_import(),
    "scheduler": lambda root: bench_scheduler(),
    "unet": bench_unet_sampling,
    "tiny_sd": bench_tiny_sd,
    "sd15_load": bench_sd15_load,
    "cold_start": bench_cold_start,
    "gpu": bench_gpu,
    "sdxl_load": bench_sdxl_load,
    "sdxl_unet_parity": bench_sdxl_unet_parity,
    "gpu_sdxl_unet": bench_gpu_sdxl_unet,
}
GPU_SECTIONS = ("gpu", "gpu_sdxl_unet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "diffusekit-bench"))
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (1 gives steadier figures on a busy shared machine)")
    args = parser.parse_args()
    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # the reference warns about deprecated config keys on every load
    for name in chosen:
        if name in GPU_SECTIONS and not torch.cuda.is_available():
            print(f"{name}: skipped (no CUDA device)")
            RESULTS[name] = {"skipped": "no CUDA device"}
            continue
        try:
            SECTIONS[name](root)
        except Exception as err:  # report and go on: one missing piece should not hide the rest
            print(f"{name}: failed ({type(err).__name__}: {err})")
            RESULTS[name] = {"error": f"{type(err).__name__}: {err}"}
    import diffusers

    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "machine": platform.platform(), "processor": platform.processor(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
