"""LoRA load / unload / fuse timings, diffusekit vs the reference (diffusers + peft), as ratios.

    python benchmarks/lora_bench.py [--repeats 7] [--rank 8]

A Stable Diffusion pipeline with a scaled-down UNet (all SD 1.x block kinds, narrower channels) and
a CLIP text encoder; the LoRA targets every attention projection and feed-forward layer of the UNet
and every q/k/v/out projection of the text encoder (the usual kohya/peft target set). Ratios are
diffusekit / reference: below 1.0 means diffusekit is faster. Runs single-threaded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

UNET = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=128,
            attention_head_dim=8, norm_num_groups=32, sample_size=32)
LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "q_proj", "k_proj", "v_proj",
                 "out_proj")


def _build_folder(folder: Path) -> None:
    import diffusers
    from sd_components import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(folder / "_tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                                num_hidden_layers=6, vocab_size=len(tokenizer)))
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**UNET), vae=diffusers.AutoencoderKL(norm_num_groups=8,
                                                                                block_out_channels=(8,)),
        text_encoder=text_encoder, tokenizer=tokenizer, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def _lora_state(pipe, rank: int) -> dict[str, torch.Tensor]:
    state = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(LORA_SUFFIXES):
                state[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.01
                state[f"{component}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.01
    return state


def _load_unload_times(pipe, state, repeats: int) -> tuple[float, float]:
    """Median seconds of ``load_lora_weights`` and of ``unload_lora_weights``."""
    loads, unloads = [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        pipe.load_lora_weights(dict(state), adapter_name="bench")
        middle = time.perf_counter()
        pipe.unload_lora_weights()
        loads.append(middle - start)
        unloads.append(time.perf_counter() - middle)
    return statistics.median(loads[1:]), statistics.median(unloads[1:])


def _fuse_unfuse_time(pipe, state, repeats: int) -> float:
    pipe.load_lora_weights(dict(state), adapter_name="bench")
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.fuse_lora()
        pipe.unfuse_lora()
        samples.append(time.perf_counter() - start)
    pipe.unload_lora_weights()
    return statistics.median(samples)


def bench(repeats: int = 7, rank: int = 8) -> dict:
    import diffusers

    import diffusekit

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # small matmuls: threads only contend (and the CI machine is shared)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _build_folder(folder)
        pipes = {"diffusekit": diffusekit.StableDiffusionPipeline.from_pretrained(folder),
                 "reference": diffusers.StableDiffusionPipeline.from_pretrained(folder)}
    state = _lora_state(pipes["diffusekit"], rank)
    results: dict = {"layers": len(state) // 2}
    for lib, pipe in pipes.items():
        load, unload = _load_unload_times(pipe, state, repeats)
        results[lib] = {"load": load, "unload": unload, "fuse+unfuse": _fuse_unfuse_time(pipe, state, repeats)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    results = bench(args.repeats, args.rank)
    print(f"LoRA on {results['layers']} Linear layers, rank {args.rank}, median of {args.repeats}")
    print(f"{'operation':<14}{'diffusekit ms':>15}{'reference ms':>15}{'ratio':>8}")
    for operation in ("load", "unload", "fuse+unfuse"):
        ours, ref = results["diffusekit"][operation], results["reference"][operation]
        print(f"{operation:<14}{ours * 1e3:>15.2f}{ref * 1e3:>15.2f}{ours / ref:>8.3f}")


if __name__ == "__main__":
    main()
