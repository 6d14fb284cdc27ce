"""Compiled denoiser on CPU: compile time and per-step time, eager vs ``pipe.compile`` (regional and full).

    python benchmarks/compile_cpu.py                          # tiny UNet and SD 1.5-size UNet, inductor
    python benchmarks/compile_cpu.py --models tiny --steps 20 --threads 1
    python benchmarks/compile_cpu.py --models sd15 --variants regional   # skip the (slow) full compile

One UNet forward is one sampling step (batch 1, float32, random weights; SD 1.5 size: 64x64
latents, 77 text tokens). Compile time is the first compiled call minus one compiled step. Each
variant runs in a fresh process with an empty inductor cache, so every compile is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

#: name -> (UNet config, latent size, text tokens, text width)
MODELS = {
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=4),
             16, 7, 32),
    "sd15": (None, 64, 77, 768),
}
VARIANTS = ("eager", "regional", "full")


def build(name: str):
    """The UNet (random weights, fixed seed) and its forward inputs."""
    import torch

    import diffusekit
    from run import SD15_UNET

    config, size, tokens, width = MODELS[name]
    torch.manual_seed(0)
    model = diffusekit.UNet2DConditionModel(**(config or SD15_UNET)).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, size, size, generator=gen), torch.tensor(500),
              torch.randn(1, tokens, width, generator=gen))
    return model, inputs


def measure(name: str, variant: str, steps: int) -> dict:
    """One variant in this process: first-call time, median step time and the output (for the diff)."""
    import torch

    from diffusekit.pipelines.compile import compile_denoiser

    model, (sample, t, text) = build(name)
    if variant != "eager":
        compile_denoiser(model, regional=variant == "regional", backend="inductor")
    with torch.no_grad():
        start = time.perf_counter()
        out = model(sample, t, encoder_hidden_states=text).sample
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(sample, t, encoder_hidden_states=text)
            times.append(time.perf_counter() - start)
    return {"first_call_s": first, "step_s": statistics.median(times), "output": out}


def run_variant(name: str, variant: str, steps: int, threads: int, folder: Path) -> dict:
    """:func:`measure` in a fresh process with its own empty inductor cache."""
    out = folder / f"{name}-{variant}.pt"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=folder)}
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.set_num_threads({threads});"
            f" import compile_cpu as c; r = c.measure({name!r}, {variant!r}, {steps}); torch.save(r, {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    import torch

    return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]),
                        help="compiled variants to run after eager: regional, full")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after the first call)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="compile-cpu-results.json")
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS[1:]) | set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown models or variants {unknown}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            eager = None
            for variant in ("eager", *args.variants.split(",")):
                r = run_variant(name, variant, args.steps, args.threads, Path(tmp))
                eager = eager or r
                results[f"{name} {variant}"] = row = summarise(r, eager, variant)
                print(f"{name:<5} {variant:<9} compile {row['compile_s']:8.1f} s   step {row['step_s']:8.4f} s   "
                      f"x{row['speedup']:5.2f}   max diff {row['max_abs_diff']:.1e}", flush=True)
                Path(args.out).write_text(json.dumps({"threads": args.threads, "results": results}, indent=2) + "\n")


def summarise(run: dict, eager: dict, variant: str) -> dict:
    """Compile time (first call minus a step), step time, speed-up and max difference against eager."""
    return {"compile_s": run["first_call_s"] - run["step_s"] if variant != "eager" else 0.0,
            "step_s": run["step_s"], "speedup": eager["step_s"] / run["step_s"],
            "max_abs_diff": float((run["output"] - eager["output"]).abs().max())}


if __name__ == "__main__":
    main()
