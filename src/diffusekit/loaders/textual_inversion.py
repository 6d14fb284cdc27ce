"""Textual inversion: new tokens whose embeddings come from a file (:class:`TextualInversionLoaderMixin`).

Formats read:

* diffusers: ``learned_embeds.safetensors`` (or ``.bin``) holding ``{token: tensor}`` (one key);
* A1111: ``{"string_to_param": {"*": tensor}, "name": token, ...}`` (``.pt`` pickles are read with
  ``weights_only=True``) and ``{"emb_params": tensor}`` (safetensors; the token defaults to the file
  name, as A1111 does);
* a bare tensor (``token=`` required);
* A1111 SDXL: ``{"clip_l": tensor, "clip_g": tensor}`` (token from the file name): ``clip_l`` goes to
  ``text_encoder`` / ``tokenizer`` and ``clip_g`` to ``text_encoder_2`` / ``tokenizer_2``; with
  ``text_encoder=`` given, the entry whose width fits it. The reference's way, one call per encoder
  with ``state["clip_g"], text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2``, works too.

An embedding of n > 1 vectors adds the tokens ``token, token_1, ... token_{n-1}``, and
:func:`convert_prompt` rewrites ``token`` in a prompt to ``"token token_1 ... token_{n-1}"``, as the
reference does. The pipelines call ``maybe_convert_prompt`` in ``encode_prompt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..hub import resolve_first_file, split_hub_kwargs
from ..weights import WeightsError, load_file

logger = logging.getLogger(__name__)

TI_WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def read_embedding_file(path_or_dict, weight_name: str | None = None, **hub_kwargs) -> tuple[Any, str, str | None]:
    """``(state dict or tensor, source name, token suggested by the file name)``."""
    if isinstance(path_or_dict, (dict, torch.Tensor)):
        return path_or_dict, "textual inversion state dict", None
    path = Path(path_or_dict)
    if not path.is_file():
        path = resolve_first_file(path_or_dict, [weight_name] if weight_name else TI_WEIGHT_NAMES,
                                  "textual inversion", **hub_kwargs)
    return load_file(path), str(path), path.stem


def token_and_embedding(state, token: str | None, source: str, file_token: str | None) -> tuple[str, torch.Tensor]:
    """The token name and its (vectors, dim) or (dim,) embedding, from any supported format."""
    if isinstance(state, torch.Tensor):
        found_token, embedding = None, state
    elif isinstance(state, dict) and "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise WeightsError(f"{source}: A1111 embedding without string_to_param['*']")
        found_token, embedding = state.get("name"), params["*"]
    elif isinstance(state, dict) and "emb_params" in state:
        found_token, embedding = file_token, state["emb_params"]
    elif isinstance(state, dict) and len(state) == 1:
        found_token, embedding = next(iter(state.items()))
    else:
        keys = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise WeightsError(f"{source}: not a textual inversion embedding (expected one {{token: tensor}} entry, "
                           f"string_to_param or emb_params; found {keys})")
    if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2):
        raise WeightsError(f"{source}: the embedding must be a 1-D or 2-D tensor")
    if token is None:
        if not isinstance(found_token, str):
            raise ValueError(f"{source}: the file names no token; pass token=...")
        token = found_token
    return token, embedding


def check_token(token: Any, tokenizer, source: str) -> None:
    """ValueError naming ``token``: not a str, empty or whitespace, or an existing word of the
    tokenizer's vocabulary (it would take that word's place in every prompt)."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"{source}: the token must be a non-empty, non-blank str, got {token!r}")
    vocab = tokenizer.get_vocab()
    pieces = tokenizer.tokenize(token)
    if token in vocab or (len(pieces) == 1 and pieces[0] in vocab):
        raise ValueError(f"{source}: token {token!r} is already in the tokenizer's vocabulary (as {pieces}); "
                         "choose another token= name")


def expand_tokens(token: str, embedding: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """``token, token_1, ...`` and one vector each."""
    vectors = list(embedding) if embedding.ndim == 2 else [embedding]
    return [token] + [f"{token}_{i}" for i in range(1, len(vectors))], vectors


def convert_prompt(prompt: str, tokenizer) -> str:
    """Rewrite each multi-vector token ``t`` in ``prompt`` to ``"t t_1 ... t_{n-1}"``."""
    added = tokenizer.added_tokens_encoder
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token not in added:
            continue
        replacement, i = token, 1
        while f"{token}_{i}" in added:
            replacement += f" {token}_{i}"
            i += 1
        prompt = prompt.replace(token, replacement)
    return prompt


class TextualInversionLoaderMixin:
    """``load_textual_inversion`` and the prompt rewrite for pipelines with ``tokenizer``/``text_encoder``."""

    def maybe_convert_prompt(self, prompt, tokenizer=None):
        """``prompt`` (str or list) with multi-vector tokens expanded; None stays None."""
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        if prompt is None or tokenizer is None:
            return prompt
        if isinstance(prompt, list):
            return [convert_prompt(p, tokenizer) for p in prompt]
        return convert_prompt(prompt, tokenizer)

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               tokenizer=None, text_encoder=None, weight_name: str | None = None,
                               **kwargs: Any) -> None:
        """Add the token(s) of one or more embedding files (or dicts/tensors) to the tokenizer and
        the text encoder's input embeddings (SDXL files: to both pairs; see the module docstring).
        Everything is checked before anything is added."""
        hub = split_hub_kwargs(kwargs)
        kwargs.pop("use_safetensors", None)
        if kwargs:
            raise TypeError(f"load_textual_inversion got unexpected arguments {sorted(kwargs)}")
        explicit = tokenizer is not None or text_encoder is not None
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        text_encoder = text_encoder or getattr(self, "text_encoder", None)
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens = token if isinstance(token, list) else [token] * len(sources)
        if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], torch.Tensor):
            sources = list(sources[0])  # one tensor holding one embedding per token
        if len(tokens) != len(sources):
            raise ValueError(f"{len(sources)} embeddings but {len(tokens)} tokens; pass one token per embedding")

        pairs = {"first": (tokenizer, text_encoder)}
        if not explicit:
            pairs["second"] = (getattr(self, "tokenizer_2", None), getattr(self, "text_encoder_2", None))
        pairs = {name: pair for name, pair in pairs.items() if None not in pair}
        entries: dict[str, list] = {name: [] for name in pairs}
        for source, wanted in zip(sources, tokens):
            state, where, file_token = read_embedding_file(source, weight_name, **hub)
            for pair, part in _split_dual(state, where, pairs, explicit).items():
                entries[pair].append((part, where, file_token, wanted))
        plans = [(pairs[name], _plan_tokens(items, *pairs[name])) for name, items in entries.items() if items]
        for (pair_tokenizer, pair_encoder), (new_tokens, vectors) in plans:
            _add_tokens(pair_tokenizer, pair_encoder, new_tokens, vectors)


#: A1111 SDXL embedding keys -> the tokenizer/text-encoder pair they belong to
_DUAL_KEYS = {"clip_l": "first", "clip_g": "second"}


def _split_dual(state, where: str, pairs: dict, explicit: bool) -> dict:
    """``{pair name: embedding state}``: an SDXL ``clip_l``/``clip_g`` file split over the pairs the
    pipeline has (with an explicit text encoder: only the entry as wide as it), anything else to the
    first pair."""
    dual = isinstance(state, dict) and set(state) == set(_DUAL_KEYS)
    if not pairs or ("first" not in pairs and (explicit or not dual)):
        raise ValueError("load_textual_inversion needs a tokenizer and a text encoder (pass tokenizer=, "
                         "text_encoder= or use a pipeline that has them)")
    if not dual:
        return {"first": state}
    if not explicit:
        missing = [key for key, pair in _DUAL_KEYS.items() if pair not in pairs]
        if missing:
            logger.warning("%s: the pipeline has no text encoder for the embedding's %s; not loaded", where, missing)
        return {pair: {"emb_params": state[key]} for key, pair in _DUAL_KEYS.items() if pair in pairs}
    dim = pairs["first"][1].get_input_embeddings().weight.shape[-1]
    fitting = [key for key in _DUAL_KEYS if isinstance(state[key], torch.Tensor) and state[key].shape[-1] == dim]
    if len(fitting) != 1:
        raise ValueError(f"{where}: {len(fitting)} of the SDXL embedding's entries (clip_l, clip_g) are {dim} wide "
                         "like the given text encoder; pass state['clip_l'] or state['clip_g'] itself")
    return {"first": {"emb_params": state[fitting[0]]}}  # A1111's format: the token is the file's name


def _plan_tokens(items: list, tokenizer, text_encoder) -> tuple[list[str], list[torch.Tensor]]:
    """The new token names and vectors of ``items`` ((state, source, file token, wanted token)), checked."""
    vocab = tokenizer.get_vocab()
    new_tokens: list[str] = []
    vectors: list[torch.Tensor] = []
    dim = text_encoder.get_input_embeddings().weight.shape[-1]
    for state, where, file_token, wanted in items:
        name, embedding = token_and_embedding(state, wanted, where, file_token)
        check_token(name, tokenizer, where)
        if not torch.isfinite(embedding).all():
            raise WeightsError(f"{where}: the embedding of token {name!r} holds NaN or infinite values")
        names, rows = expand_tokens(name, embedding)
        clash = [n for n in names if n in vocab or n in new_tokens or f"{name}_1" in vocab]
        if clash:
            raise ValueError(f"{where}: token {name!r} is already in the tokenizer's vocabulary ({clash}); "
                             "choose another token= name")
        if embedding.shape[-1] != dim:
            raise ValueError(f"{where}: embedding size {embedding.shape[-1]} does not match the text encoder's {dim}")
        new_tokens += names
        vectors += rows
    return new_tokens, vectors


def _add_tokens(tokenizer, text_encoder, new_tokens: list[str], vectors: list[torch.Tensor]) -> None:
    tokenizer.add_tokens(new_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vector in zip(new_tokens, vectors):
            weight[tokenizer.convert_tokens_to_ids(name)] = vector.to(device=weight.device, dtype=weight.dtype)
    logger.info("loaded textual inversion tokens %s", new_tokens)


__all__ = ["TextualInversionLoaderMixin", "convert_prompt", "token_and_embedding"]
