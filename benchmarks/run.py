"""Side-by-side benchmarks against the reference (diffusers), in one run, printed as ratios.

    make bench                       # everything that this machine can run
    python benchmarks/run.py --only import,scheduler

Ratios are diffusekit / reference: below 1.0 means diffusekit is faster. Results go to
bench-results.json. GPU sections run only when CUDA is available.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS: dict[str, dict] = {}


def record(name: str, ours: float, reference: float, unit: str = "s", **extra) -> None:
    ratio = ours / reference if reference else float("nan")
    RESULTS[name] = {"diffusekit": ours, "reference": reference, "ratio": ratio, "unit": unit, **extra}
    print(f"{name:<44} diffusekit {ours:10.4f} {unit}   reference {reference:10.4f} {unit}   ratio {ratio:6.3f}")


def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- import ----------------------------------------------------------------------------------------

_IMPORT_PROBE = """
import resource, sys, time
start = time.perf_counter()
{stmt}
elapsed = time.perf_counter() - start
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'transformers' in sys.modules)
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
    import diffusers

    import diffusekit

    sample = torch.randn(2, 4, 64, 64)
    for name in SCHEDULERS:
        per_step = []
        for lib in (diffusekit, diffusers):
            scheduler = getattr(lib, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            steps = 30

            takes_generator = "generator" in inspect.signature(scheduler.step).parameters

            def run() -> None:
                scheduler.set_timesteps(steps)
                x = sample
                extra = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
                for t in scheduler.timesteps:
                    x = scheduler.step(0.1 * x, t, x, **extra).prev_sample

            per_step.append(timed(run, repeat=3) / len(scheduler.timesteps))
        record(f"scheduler step {name}", per_step[0] * 1e3, per_step[1] * 1e3, unit="ms")


# -- pixel UNet sampling ---------------------------------------------------------------------------

def _tiny_unet_folder(root: Path, size: int) -> Path:
    import diffusers

    folder = root / f"ddpm-{size}"
    if not folder.exists():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                     block_out_channels=(32, 64), norm_num_groups=8,
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(folder)
    return folder


def bench_unet_sampling(root: Path) -> None:
    import diffusers

    import diffusekit

    for size in (32, 64):
        folder = _tiny_unet_folder(root, size)
        outputs, times = [], []
        for lib in (diffusekit, diffusers):
            pipe = lib.DDIMPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)

            def run():
                return pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                            output_type="np").images

            times.append(timed(run, repeat=3))
            outputs.append(run())
        diff = float(abs(outputs[0] - outputs[1]).max())
        record(f"DDIM sampling UNet2DModel {size}x{size}", times[0], times[1], max_abs_diff=diff)


# -- Stable Diffusion ------------------------------------------------------------------------------

def _tiny_sd_folder(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "parity"))
    from sd_fixtures import save_tiny_sd_pipeline  # the parity tests' tiny reference pipeline

    folder = root / "tiny-sd"
    if not folder.exists():
        save_tiny_sd_pipeline(folder)
    return folder


def bench_tiny_sd(root: Path) -> None:
    import diffusers

    import diffusekit

    folder = _tiny_sd_folder(root)
    outputs, times = [], []
    for lib in (diffusekit, diffusers):
        pipe = lib.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def run():
            return pipe("a photo of a cat", num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                        generator=torch.Generator().manual_seed(0), output_type="np").images

        times.append(timed(run, repeat=3))
        outputs.append(run())
    record("tiny SD pipeline sampling (10 steps)", times[0], times[1],
           max_abs_diff=float(abs(outputs[0] - outputs[1]).max()))


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def _sd15_folder(root: Path) -> Path:
    """An SD 1.5-size pipeline with random weights in float16, saved by the reference."""
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


def bench_sd15_load(root: Path) -> None:
    import gc

    import diffusers

    import diffusekit

    folder = _sd15_folder(root)
    times = []
    for lib in (diffusekit, diffusers):
        def load():
            pipe = lib.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
            del pipe
            gc.collect()

        times.append(timed(load, repeat=3))
    record("from_pretrained SD 1.5-size fp16", times[0], times[1])


SECTIONS = {
    "import": lambda root: bench_import(),
    "scheduler": lambda root: bench_scheduler(),
    "unet": bench_unet_sampling,
    "tiny_sd": bench_tiny_sd,
    "sd15_load": bench_sd15_load,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "diffusekit-bench"))
    parser.add_argument("--out", default="bench-results.json")
    args = parser.parse_args()
    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    torch.set_num_threads(os.cpu_count() or 1)
    for name in chosen:
        try:
            SECTIONS[name](root)
        except Exception as err:  # report and go on: one missing piece should not hide the rest
            print(f"{name}: skipped ({type(err).__name__}: {err})")
            RESULTS[name] = {"error": f"{type(err).__name__}: {err}"}
    meta = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
