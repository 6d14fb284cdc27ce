#!/usr/bin/env bash
# Reference (diffusers) vs diffusekit denoising loops on one CUDA GPU, eager and compiled, side by side:
# SD 1.5 512px 50 steps batch 1 and 8, SDXL 1024px 30 steps, FLUX.1-dev size 1024px 28 steps (random
# weights at real sizes, fp16/bf16); compile time, step time, peak VRAM, ratio to the FLOP floor, max diff.
#
#   benchmarks/gpu.sh                  # needs torch with CUDA and diffusers installed; installs nothing
#   benchmarks/gpu.sh --dry-run        # (or DRY_RUN=1) the same code on CPU, tiny models, 2 steps
#   benchmarks/gpu.sh --only sd15,flux --peak-tflops 989
#   PYTHON=/path/to/python benchmarks/gpu.sh
#
# Options go to benchmarks/gpu_bench.py (its docstring explains the columns).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  args+=(--dry-run)
fi
exec "${PYTHON:-python}" "$here/gpu_bench.py" "${args[@]}"
