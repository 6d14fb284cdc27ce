"""How many of diffusers' own fast tests pass with diffusekit's classes standing in.

    python benchmarks/compat/run.py --diffusers-tests /path/to/diffusers --subset schedulers
    python benchmarks/compat/run.py --diffusers-tests /path/to/diffusers --subset all --out compat-results

``--diffusers-tests`` is a diffusers checkout (or its ``tests`` folder); nothing of it is copied
here. The subset's test files run twice in fresh pytest processes, offline: plainly (the baseline: which
tests pass with diffusers) and with ``-p standin_plugin`` (diffusekit's classes standing in, see
``standin.py``). Only tests that pass in the baseline count, less those matched by
``exclusions.txt`` (tests of the reference's private internals). Failures are grouped by cause.
Results: ``<out>/<subset>.json`` (over every run of the subset kept in ``<out>``: runs of parts with
``--only`` add up) and a summary on stdout.
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
SUBSET_TIMEOUT_S = 3600

# (category, regex on the failure text, group key taken from the regex's first group if any)
CAUSES: list[tuple[str, str]] = [
    ("missing class", r"diffusekit has no class (\w+)"),
    ("missing method/attribute", r"has no attribute '(\w+)'"),
    ("unsupported argument", r"got an unexpected keyword argument '(\w+)'"),
    ("unsupported argument", r"missing \d+ required (?:positional|keyword-only) argument: '(\w+)'"),
    ("import error", r"(?:ImportError|ModuleNotFoundError): (?:cannot import name )?'?([\w.]+)"),
    ("numeric mismatch", r"(allclose|not close|not almost equal|max_diff|max diff|Max diff|assert_mean_pixel_difference)"),
    ("numeric mismatch", r"assert (?:tensor|np\.)?.*[<>]=? ?\d"),
    ("step at a timestep outside scheduler.timesteps", r"(is not in this scheduler's timesteps)"),
    ("frozen config written to", r"(config is frozen)"),
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


def run_pytest(checkout: Path, files: list[Path], standin: bool, junit: Path, timeout_s: int) -> str:
    """Run ``files`` in one fresh pytest process; return '' or a note (timeout, crash)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    plugin = ["-p", "standin_plugin"] if standin else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *plugin,
           f"--junitxml={junit}", *(str(f.relative_to(checkout)) for f in files)]
    try:
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s} s"
    if not junit.is_file():
        return f"no results (exit {proc.returncode}): {proc.stdout[-500:]}{proc.stderr[-500:]}"
    return ""


def node_id(classname: str, name: str) -> str:
    """pytest-style id from a junit classname (``tests.a.test_b.SomeTest``) and test name."""
    parts = classname.split(".")
    cls = [parts.pop()] if parts and parts[-1][:1].isupper() else []
    return "::".join(["/".join(parts) + ".py", *cls, name])


def read_junit(junit: Path) -> dict[str, dict[str, str]]:
    """Node id -> {'outcome': passed|failed|error|skipped, 'message': first failure text}."""
    results: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                message = f"{found.get('message', '')}\n{found.text or ''}"
                break
        results[node_id(case.get("classname", ""), case.get("name", ""))] = {"outcome": outcome,
                                                                             "message": message[:4000]}
    return results


def classify(message: str) -> tuple[str, str]:
    """(cause, key) for a failure text, e.g. ('missing class', 'TCDScheduler'); the first line
    (the exception) is searched before the whole traceback."""
    first_line = message.split("\n", 1)[0]
    for text, (cause, pattern) in ((t, c) for t in (first_line, message) for c in CAUSES):
        found = re.search(pattern, text)
        if found:
            key = found.group(1) if found.groups() and cause != "numeric mismatch" else ""
            private = cause == "missing method/attribute" and key.startswith("_")
            return ("private attribute (exclusion candidate)" if private else cause), key
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


_UNSAFE_IN_NAME = re.compile(r"[^\w.-]")


def part_tag(only: list[str]) -> str:
    """File-name tag of a run over part of a subset: '' for the whole, '[a+b]' for ``--only a --only b``."""
    return "[" + "+".join(_UNSAFE_IN_NAME.sub("_", o) for o in only) + "]" if only else ""


def read_parts(out: Path, subset: str, mode: str) -> dict[str, dict[str, str]]:
    """Results of every run of ``subset`` in ``mode`` kept in ``out`` (the whole and each part), oldest
    first so that a newer run of a test wins."""
    results: dict[str, dict[str, str]] = {}
    for junit in sorted(out.glob(f"{subset}*-{mode}.xml"), key=lambda p: p.stat().st_mtime):
        if junit.name == f"{subset}-{mode}.xml" or junit.name.startswith(f"{subset}["):
            results.update(read_junit(junit))
    return results


def run_subset(checkout: Path, subset: str, out: Path, timeout_s: int, only: list[str]) -> dict:
    """Both runs of the files of ``subset`` (those naming one of ``only``, if given) and the comparison
    over every run of the subset kept in ``out`` (parts add up), written to ``<out>/<subset>.json``.
    A junit file already in ``<out>`` is reused (delete it to rerun)."""
    files = [f for f in subset_files(checkout / "tests", subset) if not only or any(o in str(f) for o in only)]
    notes: dict[str, str] = {}
    for mode in ("baseline", "standin"):
        junit = out / f"{subset}{part_tag(only)}-{mode}.xml"
        if not junit.is_file():
            note = run_pytest(checkout, files, mode == "standin", junit, timeout_s)
            notes.update({mode: note} if note else {})
        count = len(read_junit(junit)) if junit.is_file() else 0
        print(f"  {mode}: {count} tests {notes.get(mode, '')}", flush=True)
    runs = {mode: read_parts(out, subset, mode) for mode in ("baseline", "standin")}
    report = compare(runs["baseline"], runs["standin"], read_exclusions(HERE / "exclusions.txt"))
    ran = sorted({node.split("::")[0] for node in runs["baseline"]})
    report.update(subset=subset, only=only, files=ran, notes=notes)
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
    parser.add_argument("--timeout", type=int, default=SUBSET_TIMEOUT_S, help="seconds per subset and run")
    parser.add_argument("--out", type=Path, default=Path("compat-results"))
    parser.add_argument("--only", action="append", default=[], help="run only files whose path contains this")
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
        report = run_subset(checkout, subset, args.out, args.timeout, args.only)
        print(summary(report, args.top), f"\n  ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
