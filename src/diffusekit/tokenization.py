"""Tokenizers through the ``tokenizers`` library directly (no transformers import).

:class:`Tokenizer` reads a transformers tokenizer folder (``tokenizer.json`` where present, else
CLIP's ``vocab.json`` + ``merges.txt``, with ``tokenizer_config.json`` / ``special_tokens_map.json``)
and offers the part of transformers' tokenizer API that pipelines, textual inversion and user
code call: ``tokenizer(texts, padding=..., max_length=..., truncation=..., return_tensors="pt")``
with ``.input_ids`` / ``.attention_mask``, ``tokenize``, ``get_vocab``, ``add_tokens``,
``added_tokens_encoder``, ``convert_tokens_to_ids``, ``batch_decode``, the special token ids,
``model_max_length`` and ``save_pretrained``. ``CLIPTokenizer`` and ``T5TokenizerFast`` are it,
under the names that ``model_index.json`` files use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from .configuration import atomic_write, open_regular, read_json
from .hub import resolve_folder

_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # after the special tokens
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
#: Arguments callers pass switched off (the reference's pipelines do), accepted as no-ops then.
_IGNORED_WHEN_OFF = ("return_length", "return_overflowing_tokens", "return_token_type_ids")
#: Largest model_max_length transformers writes for "no limit".
_NO_LIMIT = int(1e30)


class BatchEncoding(dict):
    """``input_ids`` (and ``attention_mask``) as keys and attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _special_text(value: Any) -> str | None:
    """A special token as written in the config files: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A tokenizer folder of transformers' format, run by the ``tokenizers`` library."""

    #: The library ``model_index.json`` names for this class (it stands in for transformers').
    model_index_library = "transformers"

    def __init__(self, backend, config: dict[str, Any], files: dict[str, Path] | None = None) -> None:
        self._backend = backend
        self.init_kwargs = config
        self._files = files or {}
        self.model_max_length = int(config.get("model_max_length") or _NO_LIMIT)
        self.padding_side = config.get("padding_side", "right")
        for name in _SPECIAL_NAMES:
            setattr(self, name, _special_text(config.get(name)))

    # -- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **hub_kwargs: Any) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        for key in ("use_fast", "legacy", "local_files_only_fallback"):
            hub_kwargs.pop(key, None)
        folder = resolve_folder(pretrained_model_name_or_path, subfolder=subfolder,
                                allow_patterns=["*.json", "*.txt", "*.model"], **hub_kwargs)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                config.update(read_json(folder / name))
        files = {name: folder / name for name in ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model")
                 if (folder / name).is_file()}
        if "tokenizer.json" in files:
            with open_regular(files["tokenizer.json"]) as f:
                backend = Backend.from_str(f.read().decode("utf-8"))
        elif {"vocab.json", "merges.txt"} <= set(files):
            backend = _clip_backend(files["vocab.json"], files["merges.txt"], config)
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json, and no vocab.json + merges.txt to build one from")
        tokenizer = cls(backend, config, files)
        tokenizer._add_config_tokens(folder)
        return tokenizer

    def _add_config_tokens(self, folder: Path) -> None:
        """Special tokens the config names, and ``added_tokens.json``, as added tokens of the backend."""
        from tokenizers import AddedToken

        specials = [t for t in (getattr(self, n) for n in _SPECIAL_NAMES) if t]
        extra = [_special_text(t) for t in self.init_kwargs.get("additional_special_tokens") or []]
        self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + extra if t])
        added = folder / "added_tokens.json"
        if added.is_file():
            for token, _ in sorted(read_json(added).items(), key=lambda item: item[1]):
                if self._backend.token_to_id(token) is None:
                    self._backend.add_tokens([token])

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> tuple[str, ...]:
        """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` (and copy
        the vocabulary files it was read from)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, source in self._files.items():
            if name != "tokenizer.json" and source.resolve() != (folder / name).resolve():
                shutil.copyfile(source, folder / name)
        text = self._backend.to_str()
        atomic_write(folder / "tokenizer.json", lambda f: f.write(text.encode("utf-8")))
        config = dict(self.init_kwargs, model_max_length=self.model_max_length)
        specials = {n: getattr(self, n) for n in _SPECIAL_NAMES if getattr(self, n)}
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
            atomic_write(folder / name, lambda f, payload=payload: f.write(payload))
        return tuple(str(folder / n) for n in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"))

    # -- the vocabulary ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in self._backend.get_added_tokens_decoder().items()}

    def add_tokens(self, new_tokens: str | Iterable[str], special_tokens: bool = False) -> int:
        """Add tokens not yet in the vocabulary; returns how many were added."""
        from tokenizers import AddedToken

        tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
        made = [t if isinstance(t, AddedToken) else AddedToken(t, special=special_tokens, normalized=not special_tokens)
                for t in tokens]
        return (self._backend.add_special_tokens if special_tokens else self._backend.add_tokens)(made)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id(self.unk_token)

    # -- text <-> ids -----------------------------------------------------------------------

    def tokenize(self, text: str, **_: Any) -> list[str]:
        return self._backend.encode(text, add_special_tokens=False).tokens

    def __call__(self, text: str | list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool | str = False, return_tensors: str | None = None,
                 add_special_tokens: bool = True, return_attention_mask: bool = True, verbose: bool = True,
                 **kwargs: Any) -> BatchEncoding:
        unsupported = sorted(k for k, v in kwargs.items() if k not in _IGNORED_WHEN_OFF or v)
        if unsupported:
            raise TypeError(f"tokenizer arguments not supported here: {', '.join(unsupported)}")
        texts = [text] if isinstance(text, str) else list(text)
        encoded = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [list(e.ids) for e in encoded]
        limit = max_length or (self.model_max_length if self.model_max_length < _NO_LIMIT else None)
        if truncation and truncation != "do_not_truncate" and limit is not None:
            ids = [self._truncate(row, limit, add_special_tokens) for row in ids]
        masks = [[1] * len(row) for row in ids]
        width = {"max_length": limit, "longest": None, True: None}.get(padding, 0)
        if padding and padding != "do_not_pad":
            width = width or max((len(row) for row in ids), default=0)
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            ids = [row + [pad] * (width - len(row)) for row in ids]
            masks = [mask + [0] * (width - len(mask)) for mask in masks]
        result = BatchEncoding(input_ids=ids)
        if return_attention_mask:
            result["attention_mask"] = masks
        if return_tensors == "pt":
            import torch

            result = BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in result.items()})
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        elif isinstance(text, str):
            result = BatchEncoding({k: v[0] for k, v in result.items()})
        return result

    def _truncate(self, row: list[int], limit: int, special: bool) -> list[int]:
        """Cut to ``limit`` ids, keeping the closing special token where one was added."""
        if len(row) <= limit:
            return row
        closing = self._backend.post_processor is not None and special and row[-1] == self.eos_token_id
        return row[: limit - 1] + [row[-1]] if closing else row[:limit]

    def decode(self, ids, skip_special_tokens: bool = False, **_: Any) -> str:
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._backend.decode([int(i) for i in values], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={len(self)}, model_max_length={self.model_max_length})"


def _clip_backend(vocab: Path, merges: Path, config: dict[str, Any]):
    """CLIP's byte-level BPE (lower-cased, words end in ``</w>``), built from vocab.json and merges.txt."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    vocab_map = read_json(vocab)
    bos = _special_text(config.get("bos_token")) or "<|startoftext|>"
    eos = _special_text(config.get("eos_token")) or "<|endoftext|>"
    split = "|".join(re.escape(token) for token in (bos, eos)) + "|" + _CLIP_SPLIT
    with open_regular(merges) as f:
        lines = f.read().decode("utf-8").splitlines()
    pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    unk = _special_text(config.get("unk_token")) or "<|endoftext|>"
    backend = Backend(BPE(vocab_map, pairs, continuing_subword_prefix="", end_of_word_suffix="</w>",
                          fuse_unk=False, unk_token=unk))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(  # (sep, cls): eos closes, bos opens
        (eos, vocab_map[eos]), (bos, vocab_map[bos]), trim_offsets=False, add_prefix_space=False)
    return backend


class CLIPTokenizer(Tokenizer):
    """CLIP's tokenizer (the name SD, SDXL and FLUX folders give it)."""

    def decode(self, ids, skip_special_tokens: bool = False, **_: Any) -> str:
        """Words end in ``</w>``: each becomes a space, as transformers' CLIP tokenizer decodes."""
        return super().decode(ids, skip_special_tokens=skip_special_tokens).replace("</w>", " ").strip()


class T5TokenizerFast(Tokenizer):
    """T5's tokenizer from its ``tokenizer.json`` (FLUX's second tokenizer)."""


CLIPTokenizerFast = CLIPTokenizer
T5Tokenizer = T5TokenizerFast


def learn_word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that make each of ``words`` one token (``</w>``-terminated symbols, byte-level
    characters): the most frequent adjacent pair is merged first, ties broken by the pair's text,
    so the same words always give the same merges, and applying them in rank order rebuilds every word."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces = [list(text) for word in sorted(set(words)) for text, _ in byte_level.pre_tokenize_str(word)]
    words_symbols = [piece[:-1] + [piece[-1] + "</w>"] for piece in pieces if piece]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words_symbols:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for index, symbols in enumerate(words_symbols):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words_symbols[index] = merged


def write_word_tokenizer(save_directory: str | os.PathLike, words: Iterable[str], model_max_length: int = 77) -> Path:
    """Write a small CLIP tokenizer folder (vocab.json, merges.txt, configs) in which each of ``words``
    is one token; other text still tokenizes, into byte-level pieces. Returns the folder.

    The vocabulary holds the 256 byte symbols (plain and word-final), the merged pieces of
    :func:`learn_word_merges`, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_word_merges(word.lower() for word in words)
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length, do_lower_case=True,
                  errors="replace", add_prefix_space=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n",
                                                    encoding="utf-8")
    return folder
