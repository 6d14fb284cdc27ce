"""A whole compiled denoising step on CPU against the eager step: compile time, step time, max difference.

    python benchmarks/whole_step_cpu.py                       # tiny UNet, DDIM and Euler, inductor
    python benchmarks/whole_step_cpu.py --models tiny,sd15 --steps 10 --threads 1

One step = what ``StableDiffusionPipeline``'s loop runs per timestep: the guided batch (2), the
scheduler's input scaling, the UNet, classifier-free guidance and the scheduler's update, eager
(``guided_noise`` + ``scheduler.step``) or as the one graph of ``pipe.compile(whole_step=True)``
(``whole_step.CallPlan.step``, the code the pipelines run). Random weights, float32, batch 1. The
compiled run is in a fresh process with an empty inductor cache (a cold compile); compile = first
compiled step minus a compiled step. Max diff: the latents after all steps, compiled vs eager.
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


def measure(name: str, scheduler_name: str, compiled: bool, steps: int, backend: str) -> dict:
    """Step times (first, median of the rest) and the final latents of one loop in this process."""
    import torch

    import diffusekit
    from compile_cpu import build
    from diffusekit.pipelines import whole_step
    from diffusekit.pipelines.guidance import guided_noise

    model, (latents, _, text) = build(name)
    text = torch.cat([torch.zeros_like(text), text])
    scheduler = getattr(diffusekit, scheduler_name)(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    state = SimpleNamespace(scheduler=scheduler, lora_scale=None)
    call = whole_step.WholeStep(dict(backend=backend, fullgraph=True)).plan_call(state, model, latents, {}) if compiled else None
    inputs = dict(prompt_embeds=text, guided=True, guidance_rescale=0.0, options={})
    times = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            start = time.perf_counter()
            if call is not None:
                latents = call.step(state, model, whole_step.sd_prediction, latents, t, inputs, {"guidance_scale": 7.5})
            else:
                noise = guided_noise(model, lambda x: scheduler.scale_model_input(x, t), latents, t, text, True, 7.5)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            times.append(time.perf_counter() - start)
    return {"first_s": times[0], "step_s": statistics.median(times[1:]), "latents": latents}


def run(name: str, scheduler_name: str, compiled: bool, steps: int, threads: int, backend: str, folder: Path) -> dict:
    """:func:`measure` in a fresh process with its own empty inductor cache."""
    out = folder / f"{name}-{scheduler_name}-{compiled}.pt"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=folder)}
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.set_num_threads({threads});"
            f" import whole_step_cpu as w; torch.save(w.measure({name!r}, {scheduler_name!r}, {compiled}, {steps},"
            f" {backend!r}), {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    import torch

    return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, sd15 (benchmarks/compile_cpu.py)")
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
                diff = float((compiled["latents"] - eager["latents"]).abs().max())
                print(f"{name:<5} {scheduler_name:<23} eager step {eager['step_s'] * 1000:8.2f} ms   whole-step "
                      f"{compiled['step_s'] * 1000:8.2f} ms   x{eager['step_s'] / compiled['step_s']:5.2f}   compile "
                      f"{compiled['first_s'] - compiled['step_s']:7.1f} s   max diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
