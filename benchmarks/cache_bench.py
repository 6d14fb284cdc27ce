"""Speed-up and drift of diffusekit's caching accelerators (src/diffusekit/models/cache.py), CPU.

    python benchmarks/cache_bench.py [--steps 20] [--size 256] [--threads 2] [--only sd15,flux_tiny,flux_small]

Models have random weights (seeded): sd15 is an SD 1.5-size UNet and VAE (float32; prompt embeddings
given, so the text encoder is a tiny placeholder), guided (CFG 7.5, batched), DDIM; flux_small is
benchmarks/run.py's reduced FLUX.1 architecture (dim 1024, 2 + 4 blocks, FLUX VAE); flux_tiny the
tests' tiny FLUX (2 + 2 blocks, width 32). Each config runs the same seeded call as the uncached one;
the time is the denoising call (output_type="latent", median of --repeats, after a 2-step warm-up
call); the PSNR (dB) compares the decoded cached image with the uncached one. Random weights make
meaningless images, so the PSNR measures only how far the cache drifts from the uncached result,
not image quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from run import FLUX_SMALL_TRANSFORMER, FLUX_VAE, SD15_UNET, SD15_VAE  # noqa: E402

import diffusekit  # noqa: E402
from diffusekit.pipelines.image_processing import postprocess_images  # noqa: E402
from diffusekit.pipelines.vae_codec import decode_latents  # noqa: E402

SD_CONFIGS = {
    "DeepCache interval 2": diffusekit.DeepCacheConfig(cache_interval=2),
    "DeepCache interval 3": diffusekit.DeepCacheConfig(cache_interval=3),
    "DeepCache interval 5": diffusekit.DeepCacheConfig(cache_interval=5),
}
FLUX_CONFIGS = {
    "FirstBlockCache 0.05": diffusekit.FirstBlockCacheConfig(threshold=0.05),
    "FirstBlockCache 0.1": diffusekit.FirstBlockCacheConfig(threshold=0.1),
    "FirstBlockCache 0.2": diffusekit.FirstBlockCacheConfig(threshold=0.2),
    "FirstBlockCache 0.4": diffusekit.FirstBlockCacheConfig(threshold=0.4),
    "FasterCache (-1, 681)": diffusekit.FasterCacheConfig(is_guidance_distilled=True,
                                                          attention_weight_callback=lambda _: 0.5),
    "FasterCache (-1, 901)": diffusekit.FasterCacheConfig(is_guidance_distilled=True,
                                                          spatial_attention_timestep_skip_range=(-1, 901),
                                                          attention_weight_callback=lambda _: 0.5),
}


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def sd15_case(size: int, steps: int):
    """(pipe, denoiser, call -> latents, latents -> image) for the SD 1.5-size pipeline."""
    from sd_components import SCHEDULER_CONFIG, tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer(Path(tempfile.mkdtemp(prefix="cache-bench-")))
    torch.manual_seed(0)
    pipe = diffusekit.StableDiffusionPipeline(
        vae=diffusekit.AutoencoderKL(**SD15_VAE).eval(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=diffusekit.UNet2DConditionModel(**SD15_UNET).eval(),
        scheduler=diffusekit.DDIMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)

    def call(steps: int = steps) -> torch.Tensor:
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=size, width=size,
                    num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    def decode(latents: torch.Tensor) -> np.ndarray:
        return postprocess_images(decode_latents(pipe.vae, latents), "np")

    return pipe.unet, call, decode, SD_CONFIGS


def flux_case(transformer_config: dict, vae_config: dict, text_dim: int, size: int, steps: int):
    from flux_components import tiny_flux_pipeline

    parts = tiny_flux_pipeline(Path(tempfile.mkdtemp(prefix="cache-bench-"))).components
    torch.manual_seed(0)
    transformer = diffusekit.FluxTransformer2DModel(**transformer_config).eval()
    pipe = diffusekit.FluxPipeline(**{**parts, "transformer": transformer,
                                      "vae": diffusekit.AutoencoderKL(**vae_config).eval()})
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    pooled_dim = transformer_config["pooled_projection_dim"]
    embeds = torch.randn(1, 64, text_dim, generator=g), torch.randn(1, pooled_dim, generator=g)

    def call(steps: int = steps) -> torch.Tensor:
        return pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], height=size, width=size,
                    num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    def decode(latents: torch.Tensor) -> np.ndarray:
        return pipe.latents_to_output(latents, size, size, "np")

    return pipe.transformer, call, decode, FLUX_CONFIGS


def cases(size: int, steps: int):
    from flux_components import TRANSFORMER_CONFIG, VAE_CONFIG

    tiny = {**TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 2}
    return {
        "sd15": lambda: sd15_case(size, steps),
        "flux_small": lambda: flux_case(FLUX_SMALL_TRANSFORMER, FLUX_VAE, 1024, size, steps),
        "flux_tiny": lambda: flux_case(tiny, VAE_CONFIG, tiny["joint_attention_dim"], size, steps),
    }


def timed(call, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def bench(name: str, build, repeats: int) -> list[dict]:
    denoiser, call, decode, configs = build()
    call(steps=2)  # warm-up
    base_time, base_latents = timed(call, repeats)
    base_image = decode(base_latents)
    rows = [dict(case=name, config="uncached", seconds=base_time, speedup=1.0, psnr_db=float("inf"))]
    print(f"{name:10s} {'uncached':32s} {base_time:8.2f} s", flush=True)
    for label, config in configs.items():
        denoiser.enable_cache(config)
        try:
            seconds, latents = timed(call, repeats)
        finally:
            denoiser.disable_cache()
        rows.append(dict(case=name, config=label, seconds=seconds, speedup=base_time / seconds,
                         psnr_db=psnr(decode(latents), base_image)))
        print(f"{name:10s} {label:32s} {seconds:8.2f} s  x{base_time / seconds:5.2f}  "
              f"PSNR {rows[-1]['psnr_db']:6.2f} dB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default="sd15,flux_tiny")
    parser.add_argument("--out", default="cache-bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = cases(args.size, args.steps)
    rows = []
    for name in args.only.split(","):
        rows += bench(name, builders[name], args.repeats)
    Path(args.out).write_text(json.dumps(dict(steps=args.steps, size=args.size, threads=args.threads, rows=rows),
                                         indent=1))


if __name__ == "__main__":
    main()
