"""The CLIP tokenizer shipped with diffusekit (SD 1.x and 2.x), usable offline.

``clip_tokenizer("sd1")`` / ``clip_tokenizer("sd2")`` return a ``CLIPTokenizer`` (diffusekit's) built
from ``diffusekit/assets/tokenizers/clip`` (49408 tokens; SD 2.x pads with ``!``). The gzipped
files are written once to ``$DIFFUSEKIT_CACHE`` (default ``$XDG_CACHE_HOME/diffusekit`` or
``~/.cache/diffusekit``; the temp folder when that is not writable), in a folder named by a hash of
their content, and loaded from there.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

ASSET_ROOT = Path(__file__).resolve().parent.parent / "assets" / "tokenizers" / "clip"
FAMILIES = ("sd1", "sd2")
_SHARED_FILES = ("vocab.json.gz", "merges.txt.gz")
_FAMILY_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def cache_root() -> Path:
    """Where diffusekit keeps files it writes for itself."""
    if os.environ.get("DIFFUSEKIT_CACHE"):
        return Path(os.environ["DIFFUSEKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffusekit"


def _sources(family: str) -> dict[str, Path]:
    """Output file name -> shipped file."""
    files = {name.removesuffix(".gz"): ASSET_ROOT / name for name in _SHARED_FILES}
    files.update({name: ASSET_ROOT / family / name for name in _FAMILY_FILES})
    return files


def _write_folder(target: Path, sources: dict[str, Path]) -> Path:
    """Write the files into ``target`` through a temporary sibling folder (safe against concurrent writers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for name, source in sources.items():
            data = source.read_bytes()
            (staging / name).write_bytes(gzip.decompress(data) if source.suffix == ".gz" else data)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not another writer's folder arriving first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def clip_tokenizer_folder(family: str = "sd1") -> Path:
    """A folder holding the tokenizer files of ``family`` ("sd1" or "sd2"), written on first use."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    sources = _sources(family)
    digest = hashlib.sha256()
    for name, source in sources.items():
        digest.update(name.encode() + b"\0" + source.read_bytes())
    name = f"clip-{family}-{digest.hexdigest()[:16]}"
    user = getattr(os, "getuid", lambda: "user")()
    for root in (cache_root() / "tokenizers", Path(tempfile.gettempdir()) / f"diffusekit-{user}" / "tokenizers"):
        target = root / name
        if all((target / file).is_file() for file in sources):
            return target
        try:
            return _write_folder(target, sources)
        except OSError:
            continue
    raise OSError(f"could not write the CLIP tokenizer files to {cache_root()} or the temp folder")


def clip_tokenizer(family: str = "sd1"):
    """A new ``CLIPTokenizer`` (diffusekit's, :mod:`diffusekit.tokenization`) of SD 1.x (pad
    ``<|endoftext|>``) or SD 2.x (pad ``!``)."""
    from ..tokenization import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_folder(family))


__all__ = ["clip_tokenizer", "clip_tokenizer_folder", "cache_root"]
