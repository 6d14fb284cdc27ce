"""Quality of the class-conditional digits model, judged by a digit classifier.

    python benchmarks/digits_quality.py                       # the embedded model
    python benchmarks/digits_quality.py --model OUT --write-card
    python benchmarks/digits_quality.py --schedulers --samples 100 --write-card   # every sampler name

A small MLP trained on 70% of scikit-learn's 8x8 digits scores generated samples (16x16, average
pooled to 8x8): how often the requested class is recognised and with what confidence, next to the
same figures for the held-out real digits, and the Fréchet distance between generated and real
digits on the MLP's hidden-layer features (with the real-vs-real distance as the floor), and the
share of speckled samples (high-frequency energy above every real digit's, see digits_cleanliness.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_cleanliness import real_digit_ceiling, sampler_steps, speckled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "src" / "diffusekit" / "assets" / "digits"


def train_classifier(seed: int = 0):
    digits = load_digits()
    x = digits.images.reshape(-1, 64) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=seed,
                                                        stratify=digits.target)
    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
    classifier.fit(x_train, y_train)
    return classifier, (x_train, y_train), (x_test, y_test)


def hidden_features(classifier: MLPClassifier, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ classifier.coefs_[0] + classifier.intercepts_[0], 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), stable for singular covariances."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def to_8x8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) images in [0, 1] -> (N, 64) classifier inputs (average pooling)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(tensor, 8).reshape(len(images), 64).numpy()


def generate(model: Path, per_class: int, guidance_scale: float, steps: int, seed: int, batch: int = 250,
             timestep_spacing: str | None = None, scheduler: str | None = None):
    from diffusekit import DiffusionPipeline
    from diffusekit.schedulers.names import scheduler_from_name

    pipeline = DiffusionPipeline.from_pretrained(model)
    if scheduler is not None:
        pipeline.scheduler = scheduler_from_name(scheduler, pipeline.scheduler.config)
    if timestep_spacing is not None:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                  timestep_spacing=timestep_spacing)
    pipeline.set_progress_bar_config(disable=True)
    labels = np.repeat(np.arange(pipeline.num_classes), per_class)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    start = time.perf_counter()
    for i in range(0, len(labels), batch):
        chunks.append(pipeline(class_labels=labels[i:i + batch].tolist(), guidance_scale=guidance_scale,
                               num_inference_steps=steps, generator=generator, output_type="np").images)
    spacing = pipeline.scheduler.config.get("timestep_spacing", "?")
    return np.concatenate(chunks), labels, time.perf_counter() - start, spacing


def score(classifier, x: np.ndarray, labels: np.ndarray) -> dict:
    probs = classifier.predict_proba(x)
    return {"accuracy": float((probs.argmax(1) == labels).mean()),
            "confidence": float(probs[np.arange(len(labels)), labels].mean())}


def evaluate(model: Path, samples: int, guidance_scale: float, steps: int, seed: int,
             timestep_spacing: str | None = None) -> dict:
    """Classifier scores, Fréchet distance and speckle share of ``samples`` digits from the shipped scheduler."""
    classifier, (x_train, _), (x_test, y_test) = train_classifier(seed)
    images, labels, seconds, spacing = generate(model, samples // 10, guidance_scale, steps, seed,
                                       timestep_spacing=timestep_spacing)
    x_generated = to_8x8(images)
    # real held-out digits taken through the same 8 -> 16 -> 8 resizing as the training data
    from diffusekit.training.data import resize

    upscaled = resize(torch.tensor(x_test, dtype=torch.float32).reshape(-1, 1, 8, 8), images.shape[1])
    x_roundtrip = to_8x8(upscaled.permute(0, 2, 3, 1).numpy())
    features_test = hidden_features(classifier, x_test)
    per_class = [score(classifier, x_generated[labels == c], labels[labels == c])["accuracy"] for c in range(10)]
    return {
        "model": str(model), "samples": len(labels), "guidance_scale": guidance_scale, "steps": steps,
        "seed": seed, "sampling_seconds": seconds, "timestep_spacing": spacing, "threads": torch.get_num_threads(),
        "generated": score(classifier, x_generated, labels),
        "speckled": float(speckled(images, real_digit_ceiling(images.shape[1])).mean()),
        "generated_per_class_accuracy": per_class,
        "real_held_out": score(classifier, x_test, y_test),
        "real_held_out_resized": score(classifier, x_roundtrip, y_test),
        "frechet_generated_vs_real": frechet_distance(hidden_features(classifier, x_generated), features_test),
        "frechet_real_train_vs_real": frechet_distance(hidden_features(classifier, x_train), features_test),
        "held_out_real_count": len(y_test),
    }


def report(r: dict) -> str:
    per_class = " ".join(f"{c}:{a:.0%}" for c, a in enumerate(r["generated_per_class_accuracy"]))
    return "\n".join([
        "| measured on | accuracy (requested class) | mean confidence |",
        "|---|---|---|",
        f"| {r['samples']} generated digits (guidance {r['guidance_scale']}, {r['steps']} DDIM steps, "
        f"{r['timestep_spacing']} spacing) "
        f"| {r['generated']['accuracy']:.1%} | {r['generated']['confidence']:.3f} |",
        f"| {r['held_out_real_count']} held-out real digits | {r['real_held_out']['accuracy']:.1%} "
        f"| {r['real_held_out']['confidence']:.3f} |",
        f"| the same, resized 8 -> 16 -> 8 like the training data | {r['real_held_out_resized']['accuracy']:.1%} "
        f"| {r['real_held_out_resized']['confidence']:.3f} |",
        "",
        f"Per-class accuracy of the generated digits: {per_class}.",
        "",
        f"Speckled generated digits (high-frequency energy above every real digit's): **{r['speckled']:.1%}**.",
        "",
        f"Fréchet distance on the classifier's 64 hidden features: generated vs held-out real "
        f"**{r['frechet_generated_vs_real']:.2f}**; real training split vs held-out real (the floor) "
        f"{r['frechet_real_train_vs_real']:.2f}.",
        "",
        f"Sampling the {r['samples']} digits took {r['sampling_seconds']:.1f} s on this machine's CPU "
        f"({r.get('threads', '?')} torch thread(s), shared with other jobs; seed {r['seed']}).",
    ])


def scheduler_sweep(model: Path, samples: int, guidance_scale: float, seed: int,
                    steps: int | None = None) -> list[dict]:
    """Speckle share and accuracy of ``samples`` digits for every sampler name, at ``steps`` (default:
    each name's step count in digits_cleanliness.SAMPLER_STEPS)."""
    from diffusekit.schedulers.names import SAMPLER_NAMES

    classifier, _, _ = train_classifier(seed)
    rows = []
    for name in SAMPLER_NAMES:
        name_steps = steps or sampler_steps(name)
        images, labels, seconds, _ = generate(model, samples // 10, guidance_scale, name_steps, seed, scheduler=name)
        rows.append({"scheduler": name, "steps": name_steps, "samples": len(labels), "seconds": seconds,
                     "speckled": float(speckled(images, real_digit_ceiling(images.shape[1])).mean()),
                     "accuracy": score(classifier, to_8x8(images), labels)["accuracy"]})
    return rows


def sweep_report(rows: list[dict], guidance_scale: float, seed: int) -> str:
    lines = ["| scheduler name | steps | speckled | accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['scheduler']} | {r['steps']} | {r['speckled']:.1%} | {r['accuracy']:.1%} |" for r in rows]
    lines += ["", f"{rows[0]['samples']} digits per name ({rows[0]['samples'] // 10} of each class), "
              f"guidance {guidance_scale}, seed {seed}."]
    return "\n".join(lines)


def write_card(card: Path, text: str, section: str = "quality") -> None:
    """Replace the ``<!-- section:start --> ... <!-- section:end -->`` part of a model card with ``text``."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    content = card.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise ValueError(f"{card} has no {start} ... {end} section")
    card.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"),
                        help="override the saved scheduler's spacing")
    parser.add_argument("--schedulers", action="store_true",
                        help="speckle and accuracy for every sampler name of `diffusekit schedulers` instead "
                             "(25 steps each, more for the names in digits_cleanliness.SAMPLER_STEPS)")
    parser.add_argument("--cli-defaults", action="store_true",
                        help="with --schedulers: every name at `diffusekit generate`'s defaults (50 steps, guidance 2)")
    parser.add_argument("--write-card", action="store_true", help="write the figures into the model's README.md")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.schedulers:
        guidance, steps = (2.0, 50) if args.cli_defaults else (args.guidance_scale, None)
        results = scheduler_sweep(args.model, args.samples, guidance, args.seed, steps)
        text, section = sweep_report(results, guidance, args.seed), "schedulers"
    else:
        results = evaluate(args.model, args.samples, args.guidance_scale, args.steps, args.seed,
                           args.timestep_spacing)
        text, section = report(results), "quality"
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.write_card:
        write_card(args.model / "README.md", text, section=section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
