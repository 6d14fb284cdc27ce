"""An offline Hugging Face cache holding local stand-ins for the tiny Hub repos diffusers' fast tests load.

    python benchmarks/compat/tiny_hub.py /path/to/hub-cache
    HF_HUB_CACHE=/path/to/hub-cache python benchmarks/compat/run.py ...

diffusers' fast pipeline and LoRA tests build their models in code but read a few tiny components
from the Hub (``hf-internal-testing/tiny-random-clip``, ``tiny-random-t5``,
``peft-internal-testing/tiny-clip-text-2``, the DPT image processor). Offline, without a cache,
those tests fail in the baseline and do not count. This writes seeded look-alikes of those repos
(same classes and sizes as far as the tests rely on them: hidden size 32, vocabularies under 1000
ids) into a cache folder in the Hub layout. Weights and vocabularies are not the Hub's, so tests
comparing against recorded output slices still fail in the baseline and stay uncounted.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch

CLIP_ASSETS = Path(__file__).resolve().parents[2] / "src" / "diffusekit" / "assets" / "tokenizers" / "clip"
CLIP_VOCAB = 1000
SNAPSHOT = "0" * 40


def _snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in ``cache`` (created), with refs/main pointing at it."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    folder = root / "snapshots" / SNAPSHOT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _small_clip_vocab(size: int) -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level BPE cut to ``size`` ids: the 512 byte symbols, the first merges, the two specials."""
    vocab = json.loads(gzip.decompress((CLIP_ASSETS / "vocab.json.gz").read_bytes()))
    merges = gzip.decompress((CLIP_ASSETS / "merges.txt.gz").read_bytes()).decode().splitlines()
    header, merges = merges[:1], merges[1:size - 512 - 2 + 1]
    kept = {tok: i for tok, i in vocab.items() if i < size - 2}
    kept.update({"<|startoftext|>": size - 2, "<|endoftext|>": size - 1})
    return kept, header + merges


def write_clip_tokenizer(folder: Path) -> None:
    """A ``CLIPTokenizer`` with a ``CLIP_VOCAB``-id vocabulary in ``folder``."""
    from transformers import CLIPTokenizer

    vocab, merges = _small_clip_vocab(CLIP_VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
        tokenizer.save_pretrained(folder)


def write_clip_text_model(folder: Path) -> None:
    """A seeded 32-wide ``CLIPTextModel`` whose vocabulary matches the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                            vocab_size=CLIP_VOCAB, projection_dim=32, bos_token_id=CLIP_VOCAB - 2,
                            eos_token_id=CLIP_VOCAB - 1, pad_token_id=CLIP_VOCAB - 1, max_position_embeddings=77)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)


def write_t5(folder: Path) -> None:
    """A seeded 32-wide T5 encoder-decoder and a T5 tokenizer whose ids stay under its vocabulary."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    vocab, _ = _small_clip_vocab(CLIP_VOCAB)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(tok.replace("</w>", ""), -2.0 - i / 1000) for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
               if tok.isalnum()]
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))][:1000]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100)
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)


def write_dpt_processor(folder: Path) -> None:
    """The DPT image processor (default settings, 32 px)."""
    from transformers import DPTImageProcessor

    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def build(cache: Path) -> None:
    """Every stand-in repo, written into ``cache``."""
    write_clip_tokenizer(_snapshot(cache, "hf-internal-testing/tiny-random-clip"))
    clip2 = _snapshot(cache, "peft-internal-testing/tiny-clip-text-2")
    write_clip_tokenizer(clip2)
    write_clip_text_model(clip2)
    write_t5(_snapshot(cache, "hf-internal-testing/tiny-random-t5"))
    write_dpt_processor(_snapshot(cache, "hf-internal-testing/tiny-random-DPTForDepthEstimation"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    build(Path(sys.argv[1]))
