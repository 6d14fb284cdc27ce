"""Build the shipped CLIP tokenizer (src/diffusekit/assets/tokenizers/clip/) from OpenAI's BPE merges.

Usage: ``python scripts/build_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz`` (the file is data in
the PyPI package ``open_clip_torch``: ``pip download --no-deps open_clip_torch`` and unzip
``open_clip/bpe_simple_vocab_16e6.txt.gz``). Output is deterministic (gzip mtime 0).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / "src" / "diffusekit" / "assets" / "tokenizers" / "clip"
NUM_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes, in GPT-2's order: the printable
    Latin-1 bytes as themselves, then the other bytes mapped to 256, 257, ..."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(others))]


def build(bpe_gz: Path, target: Path = TARGET) -> None:
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:1 + NUM_MERGES]  # line 0 is a header
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_gz}: expected {NUM_MERGES} merges of two symbols after the header")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected 49408")
    target.mkdir(parents=True, exist_ok=True)
    files = {"vocab.json.gz": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")),
             "merges.txt.gz": "#version: 0.2\n" + "\n".join(merges) + "\n"}
    for name, text in files.items():
        (target / name).write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    build(Path(sys.argv[1]))
