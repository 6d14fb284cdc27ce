"""A whole compiled denoising step on CPU against the eager step: compile time, step time, max difference.

    python benchmarks/whole_step_cpu.py                       # tiny UNet, DDIM and Euler, inductor
    python benchmarks/whole_step_cpu.py --models tiny,sd15 --steps 10 --threads 1

One step = what ``StableDiffusionPipeline``'s loop runs per timestep: the guided batch (2), the
scheduler's input scaling, the UNet, classifier-free guidance and the scheduler's update, eager
(``guided_noise`` + ``scheduler.step``) or as the one graph of ``pipe.compile(whole_step=True)``
(``whole_step.CallPlan.step``, the code the pipelines run). Random weights, float32, batch 1. The
compiled run is in a fresh process with an empty inductor cache (a cold compile); compile = first
compiled step minus a compiled step. Max diff: the latents after all steps, compiled vs eager;
one step: the largest difference of a compiled step from the eager step given the same latents; eager
float32 vs float64: how far the eager loop itself moves when only the rounding changes (the floor any
reordering of float32 operations, as inductor's fused kernels do, can be held to).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler")
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_loop(name: str):
    """(denoiser, initial latents, [uncond; cond] text states, scheduler config, guidance scale).

    ``tiny`` / ``sd15``: random weights (benchmarks/compile_cpu.py), zero unconditional states, SD's
    scheduler config. ``shapes``: the embedded text-to-image model (trained weights), its own
    scheduler config (v-prediction) and text encoder, guidance 3 (the CLI default when it was measured; now 5)."""
    import torch

    from compile_cpu import build

    if name != "shapes":
        model, (latents, _, text) = build(name)
        return model, latents, torch.cat([torch.zeros_like(text), text]), SCHEDULER_CONFIG, 7.5
    from diffusekit.embedded import load_embedded_pipeline

    pipe = load_embedded_pipeline("shapes")
    ids = pipe.tokenizer(["", "a red circle at the top left and a blue square at the bottom right on a white "
                              "background"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    return pipe.unet.eval(), latents, text, config, 3.0


def measure(name: str, scheduler_name: str, compiled: bool, steps: int, backend: str, dtype: str = "float32") -> dict:
    """Step times (first, median of the rest), the final latents of one loop in this process, and for
    the compiled loop the largest difference of one compiled step from the eager step on the same input."""
    import torch

    import diffusekit
    from diffusekit.pipelines import whole_step
    from diffusekit.pipelines.guidance import guided_noise

    model, latents, text, config, guidance = build_loop(name)
    model, latents, text = model.to(getattr(torch, dtype)), latents.to(getattr(torch, dtype)), text.to(getattr(torch, dtype))
    schedulers = [getattr(diffusekit, scheduler_name).from_config(config) for _ in range(2)]
    for scheduler in schedulers:
        scheduler.set_timesteps(steps)
    scheduler, eager_scheduler = schedulers
    latents = latents * scheduler.init_noise_sigma
    state = SimpleNamespace(scheduler=scheduler, lora_scale=None)
    call = whole_step.WholeStep(dict(backend=backend, fullgraph=True)).plan_call(state, model, latents, {}) if compiled else None
    inputs = dict(prompt_embeds=text, guided=True, guidance_rescale=0.0, options={})
    times, step_diff = [], 0.0

    def eager_step(sampler, x, t):
        noise = guided_noise(model, lambda y: sampler.scale_model_input(y, t), x, t, text, True, guidance)
        return sampler.step(noise, t, x, return_dict=False)[0]

    with torch.no_grad():
        for t in scheduler.timesteps:
            reference = eager_step(eager_scheduler, latents, t) if call is not None else None
            start = time.perf_counter()
            if call is not None:
                latents = call.step(state, model, whole_step.sd_prediction, latents, t, inputs,
                                    {"guidance_scale": guidance})
            else:
                latents = eager_step(scheduler, latents, t)
            times.append(time.perf_counter() - start)
            if reference is not None:
                step_diff = max(step_diff, float((latents - reference).abs().max()))
    return {"first_s": times[0], "step_s": statistics.median(times[1:]), "latents": latents.float(),
            "step_diff": step_diff}


def run(name: str, scheduler_name: str, compiled: bool, steps: int, threads: int, backend: str, folder: Path,
        dtype: str = "float32") -> dict:
    """:func:`measure` in a fresh process with its own empty inductor cache."""
    out = folder / f"{name}-{scheduler_name}-{compiled}-{dtype}.pt"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=folder)}
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.set_num_threads({threads});"
            f" import whole_step_cpu as w; torch.save(w.measure({name!r}, {scheduler_name!r}, {compiled}, {steps},"
            f" {backend!r}, {dtype!r}), {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    import torch

    return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, sd15 (benchmarks/compile_cpu.py), shapes (the embedded model)")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS))
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (the first compiles)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for scheduler_name in args.schedulers.split(","):
                eager, compiled = (run(name, scheduler_name, c, args.steps, args.threads, args.backend, Path(tmp))
                                   for c in (False, True))
                double = run(name, scheduler_name, False, args.steps, args.threads, args.backend, Path(tmp), "float64")
                diff = float((compiled["latents"] - eager["latents"]).abs().max())
                floor = float((double["latents"] - eager["latents"]).abs().max())
                print(f"{name:<6} {scheduler_name:<23} eager step {eager['step_s'] * 1000:8.2f} ms   whole-step "
                      f"{compiled['step_s'] * 1000:8.2f} ms   x{eager['step_s'] / compiled['step_s']:5.2f}   compile "
                      f"{compiled['first_s'] - compiled['step_s']:7.1f} s   final max diff {diff:.1e}   one step "
                      f"{compiled['step_diff']:.1e}   eager float32 vs float64 {floor:.1e}", flush=True)


if __name__ == "__main__":
    main()
