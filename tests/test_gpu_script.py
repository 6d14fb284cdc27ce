"""benchmarks/gpu.sh --dry-run: the GPU benchmark's code path on CPU with tiny models prints every row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("SD1.5 512px 2 steps batch 1", "SD1.5 512px 2 steps batch 8", "SDXL 1024px 2 steps batch 1",
         "FLUX.1-dev 1024px 2 steps batch 1")
VARIANTS = ("reference eager", "reference compiled", "ours eager", "ours compiled", "ours whole-step")


def test_dry_run_prints_all_rows():
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device cpu, backend eager")
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    rows = [line.split() for line in lines[header + 2:]]
    labels = [(" ".join(r[:6]), " ".join(r[6:8])) for r in rows]
    assert labels == [(case, variant) for case in CASES for variant in VARIANTS]
    diffs = {label: float(r[-1]) for label, r in zip(labels, rows)}
    assert all(diffs[case, "ours eager"] == 0.0 and diffs[case, "ours compiled"] < 1e-4
               and diffs[case, "ours whole-step"] < 1e-4 for case in CASES), diffs
