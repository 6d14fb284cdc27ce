"""How many of diffusers' own fast tests pass with diffusekit's classes standing in.

    python benchmarks/compat/run.py --diffusers-tests /path/to/diffusers --subset schedulers
    python benchmarks/compat/run.py --diffusers-tests /path/to/diffusers --subset all --out compat-results

``--diffusers-tests`` is a diffusers checkout (or its ``tests`` folder); nothing of it is copied
here. Each test file runs twice in fresh pytest processes, offline: plainly (the baseline: which
tests pass with diffusers) and with ``-p standin_plugin`` (diffusekit's classes standing in, see
``standin.py``). Only tests that pass in the baseline count, less those matched by
``exclusions.txt`` (tests of the reference's private internals). Failures are grouped by cause.
Results: ``<out>/<subset>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Test files (relative to diffusers' tests/) for the classes diffusekit exports. Schedulers: the
# whole folder, since every scheduler the reference exports is in scope (issue 14).
SUBSETS: dict[str, list[str]] = {
    "schedulers": ["schedulers"],
    "models": [
        "models/unets/test_models_unet_1d.py",
        "models/unets/test_models_unet_2d.py",
        "models/unets/test_models_unet_2d_condition.py",
        "models/autoencoders/test_models_autoencoder_kl.py",
        "models/autoencoders/test_models_vq.py",
        "models/transformers/test_models_transformer_flux.py",
    ],
    "pipelines": [
        "pipelines/ddpm/test_ddpm.py",
        "pipelines/ddim/test_ddim.py",
        "pipelines/pndm/test_pndm.py",
        "pipelines/latent_diffusion/test_latent_diffusion.py",
        "pipelines/stable_diffusion/test_stable_diffusion.py",
        "pipelines/stable_diffusion/test_stable_diffusion_img2img.py",
        "pipelines/stable_diffusion/test_stable_diffusion_inpaint.py",
        "pipelines/stable_diffusion_2/test_stable_diffusion.py",
        "pipelines/stable_diffusion_2/test_stable_diffusion_depth.py",
        "pipelines/stable_diffusion_2/test_stable_diffusion_inpaint.py",
        "pipelines/stable_diffusion_2/test_stable_diffusion_v_pred.py",
        "pipelines/flux/test_pipeline_flux.py",
        "pipelines/flux/test_pipeline_flux_img2img.py",
    ],
    "lora": ["lora/test_lora_layers_sd.py", "lora/test_lora_layers_flux.py"],
}
FILE_TIMEOUT_S = 900

# (category, regex on the failure text, group key taken from the regex's first group if any)
CAUSES: list[tuple[str, str]] = [
    ("missing class", r"diffusekit has no class (\w+)"),
    ("missing method/attribute", r"has no attribute '(\w+)'"),
    ("unsupported argument", r"got an unexpected keyword argument '(\w+)'"),
    ("unsupported argument", r"missing \d+ required (?:positional|keyword-only) argument: '(\w+)'"),
    ("import error", r"(?:ImportError|ModuleNotFoundError): (?:cannot import name )?'?([\w.]+)"),
    ("numeric mismatch", r"(allclose|not close|not almost equal|max_diff|max diff|Max diff|assert_mean_pixel_difference)"),
    ("numeric mismatch", r"assert (?:tensor|np\.)?.*[<>]=? ?\d"),
    ("type mismatch", r"isinstance|issubclass"),
    ("not a subscriptable/mapping output", r"object is not subscriptable|object has no attribute 'keys'"),
]


def subset_files(tests_root: Path, subset: str) -> list[Path]:
    """The test files of ``subset`` (folders expanded to their ``test_*.py``), sorted."""
    files: list[Path] = []
    for rel in SUBSETS[subset]:
        path = tests_root / rel
        files.extend(sorted(path.rglob("test_*.py")) if path.is_dir() else [path])
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"--diffusers-tests {tests_root}: missing test files {missing}")
    return files


def run_file(checkout: Path, test_file: Path, standin: bool, junit: Path, timeout_s: int) -> str:
    """Run one test file in a fresh pytest process; return '' or a note (timeout, crash)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    plugin = ["-p", "standin_plugin"] if standin else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *plugin,
           f"--junitxml={junit}", str(test_file.relative_to(checkout))]
    try:
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s} s"
    if not junit.is_file():
        return f"no results (exit {proc.returncode}): {proc.stdout[-500:]}{proc.stderr[-500:]}"
    return ""


def read_junit(junit: Path, test_file: str) -> dict[str, dict[str, str]]:
    """Node id -> {'outcome': passed|failed|error|skipped, 'message': first failure text}."""
    results: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        node = f"{test_file}::{cls}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                message = f"{found.get('message', '')}\n{found.text or ''}"
                break
        results[node] = {"outcome": outcome, "message": message[:4000]}
    return results


def classify(message: str) -> tuple[str, str]:
    """(cause, key) for a failure text, e.g. ('missing class', 'TCDScheduler')."""
    for cause, pattern in CAUSES:
        found = re.search(pattern, message)
        if found:
            key = found.group(1) if found.groups() and cause != "numeric mismatch" else ""
            return cause, key
    exc = re.search(r"^E\s+(\w+(?:Error|Exception|Warning))", message, re.M)
    return "other", exc.group(1) if exc else message.strip().split("\n")[0][:80]


def read_exclusions(path: Path) -> list[tuple[str, str]]:
    """(node-id pattern, reason) pairs from ``pattern  # reason`` lines."""
    if not path.is_file():
        return []
    pairs = []
    for line in path.read_text().splitlines():
        pattern, _, reason = line.partition("#")
        if pattern.strip():
            pairs.append((pattern.strip(), reason.strip()))
    return pairs


def compare(baseline: dict, standin: dict, exclusions: list[tuple[str, str]]) -> dict:
    """Counts over the tests that pass with the reference, failures grouped by cause."""
    passing = [node for node, r in baseline.items() if r["outcome"] == "passed"]
    excluded = [n for n in passing if any(fnmatch.fnmatch(n, pat) for pat, _ in exclusions)]
    counted = [n for n in passing if n not in set(excluded)]
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    ok = 0
    for node in counted:
        result = standin.get(node, {"outcome": "missing", "message": "not run with the stand-ins"})
        if result["outcome"] == "passed":
            ok += 1
            continue
        cause, key = classify(result["message"]) if result["outcome"] != "skipped" else ("skipped", "")
        groups[cause][key].append(node)
    return {
        "passing_with_diffusers": len(counted),
        "passing_with_diffusekit": ok,
        "ratio": round(ok / len(counted), 4) if counted else None,
        "excluded": excluded,
        "failures": {cause: dict(keys) for cause, keys in groups.items()},
    }


def run_subset(checkout: Path, subset: str, out: Path, jobs: int, timeout_s: int) -> dict:
    """Both runs of every file of ``subset``; the comparison, written to ``<out>/<subset>.json``."""
    files = subset_files(checkout / "tests", subset)
    runs = {"baseline": {}, "standin": {}}
    notes: dict[str, str] = {}

    def one(item: tuple[Path, str]) -> None:
        test_file, mode = item
        rel = str(test_file.relative_to(checkout))
        junit = out / "junit" / mode / (rel.replace("/", "__") + ".xml")
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.unlink(missing_ok=True)
        note = run_file(checkout, test_file, mode == "standin", junit, timeout_s)
        if note:
            notes[f"{mode} {rel}"] = note
        else:
            runs[mode].update(read_junit(junit, rel))
        print(f"  {mode:8s} {rel} {note or 'done'}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, [(f, mode) for f in files for mode in runs]))
    report = compare(runs["baseline"], runs["standin"], read_exclusions(HERE / "exclusions.txt"))
    report.update(subset=subset, files=[str(f.relative_to(checkout)) for f in files], notes=notes)
    (out / f"{subset}.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    return report


def summary(report: dict, top: int) -> str:
    """Figures and the largest failure groups, as text."""
    lines = [f"{report['subset']}: {report['passing_with_diffusekit']} of {report['passing_with_diffusers']} "
             f"(ratio {report['ratio']}), excluded {len(report['excluded'])}"]
    for cause, keys in sorted(report["failures"].items(), key=lambda kv: -sum(map(len, kv[1].values()))):
        lines.append(f"  {cause}: {sum(map(len, keys.values()))} tests")
        for key, nodes in sorted(keys.items(), key=lambda kv: -len(kv[1]))[:top]:
            lines.append(f"    {len(nodes):4d}  {key}")
    lines.extend(f"  note: {k}: {v}" for k, v in report["notes"].items())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusers-tests", type=Path, required=True, help="diffusers checkout or its tests/")
    parser.add_argument("--subset", default="all", choices=[*SUBSETS, "all"])
    parser.add_argument("--jobs", type=int, default=1, help="test files run at once")
    parser.add_argument("--timeout", type=int, default=FILE_TIMEOUT_S, help="seconds per test file and run")
    parser.add_argument("--out", type=Path, default=Path("compat-results"))
    parser.add_argument("--top", type=int, default=15, help="failure groups shown per cause")
    args = parser.parse_args()
    checkout = args.diffusers_tests.resolve()
    checkout = checkout.parent if checkout.name == "tests" else checkout
    if not (checkout / "tests" / "testing_utils.py").is_file():
        raise SystemExit(f"--diffusers-tests {args.diffusers_tests}: no tests/testing_utils.py there")
    args.out.mkdir(parents=True, exist_ok=True)
    for subset in SUBSETS if args.subset == "all" else [args.subset]:
        start = time.monotonic()
        print(f"{subset}:", flush=True)
        report = run_subset(checkout, subset, args.out, args.jobs, args.timeout)
        print(summary(report, args.top), f"\n  ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
