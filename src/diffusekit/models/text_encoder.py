"""What diffusekit's own text encoders share: transformers' on-disk format, without transformers.

A pipeline's text encoder folder holds transformers' ``config.json`` and ``model.safetensors`` (or a
shard index, or a legacy ``pytorch_model.bin``). :class:`TextEncoderMixin` reads and writes that
format: the config keeps every key it was given (written back as read, so transformers loads our
saves), the module tree and parameter names are transformers', and the common methods that user
code and textual inversion call are there (``get_input_embeddings``, ``resize_token_embeddings``,
``dtype``, ``device``, ``save_pretrained``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..configuration import atomic_write, read_json
from ..hub import resolve_folder
from ..weights import WeightsError, find_weights, load_pickle, load_weights, save_weights
from .layers import Embedding
from .modeling import assign_tensors, skip_init

WEIGHTS_NAME = "model.safetensors"
_PICKLE_NAME = "pytorch_model.bin"


class TextConfig:
    """A transformers ``config.json``: each key an attribute (defaults from the class), all kept on save."""

    model_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(self.defaults)
        self.__dict__.update(values)
        self.model_type = type(self).model_type

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "TextConfig":
        path = Path(folder) / "config.json"
        return cls(**read_json(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in self.__dict__.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"


class TextEncoderMixin:
    """Loading, saving and the shared methods of diffusekit's transformers-format text encoders."""

    config_class: ClassVar[type[TextConfig]]
    #: Prefixes that older transformers releases put before this class's keys (tried when keys miss).
    legacy_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Keys in checkpoints that are not parameters here (e.g. ``position_ids`` buffers).
    ignored_keys: ClassVar[tuple[str, ...]] = ()
    #: Parameters that share another's tensor, ``{name: name it equals}``.
    tied_keys: ClassVar[dict[str, str]] = {}
    main_input_name = "input_ids"
    #: The library ``model_index.json`` names for this class (it stands in for transformers').
    model_index_library = "transformers"

    config: TextConfig

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        raise NotImplementedError

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grow (or cut) the token embedding to ``new_num_tokens`` rows; new rows are normal(0, 0.02)."""
        old = self.get_input_embeddings()
        weight = old.weight
        new = Embedding(new_num_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            keep = min(new_num_tokens, weight.shape[0])
            new.weight[:keep] = weight[:keep]
            if new_num_tokens > keep:
                new.weight[keep:].normal_(0.0, 0.02)
        self.set_input_embeddings(new)
        self.config.vocab_size = new_num_tokens
        return new

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                        variant: str | None = None, **hub_kwargs: Any):
        """Load from a transformers-format folder (or Hub repo) holding ``config.json`` and weights."""
        hub_kwargs.pop("low_cpu_mem_usage", None)
        folder = resolve_folder(pretrained_model_name_or_path, subfolder=subfolder,
                                allow_patterns=["*.json", "*.safetensors", "*.bin"], **hub_kwargs)
        config = cls.config_class.from_pretrained(folder)
        state, source = _read_weights(folder, variant)
        model = cls.from_state_dict(state, config, source=source, dtype=torch_dtype or dtype)
        config._name_or_path = str(pretrained_model_name_or_path)
        return model

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: TextConfig, source: Any = "state dict",
                        dtype: torch.dtype | None = None):
        """Build on meta and assign ``state`` (transformers' key names, current or legacy), checked strictly."""
        with skip_init(device="meta"):
            model = cls(config)
        expected = model.state_dict()
        state = model._our_keys(state, expected)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [f"{k}: expected {tuple(v.shape)}, got {tuple(state[k].shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
        problems = ([f"missing keys {_clip(missing)}"] if missing else []) + (
            [f"unexpected keys {_clip(unexpected)}"] if unexpected else []) + wrong[:10]
        if problems:
            raise WeightsError(f"{source} does not fit {cls.__name__}: " + "; ".join(problems))
        if dtype is not None:  # else the stored dtype, as transformers' dtype="auto"
            state = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}
        assign_tensors(model, state)
        model.tie_weights()
        config.dtype = str(model.dtype).removeprefix("torch.")
        return model.eval()

    def _our_keys(self, state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
        """``state`` without ignored keys, legacy prefixes removed, tied copies filled in."""
        state = {k: v for k, v in state.items() if not k.endswith(self.ignored_keys)}
        for prefix in self.legacy_prefixes:
            if not any(k in expected for k in state) and any(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
        for name, source in self.tied_keys.items():
            if name not in state and source in state:
                state[name] = state[source]
            elif source not in state and name in state:
                state[source] = state[name]
        return state

    def tie_weights(self) -> None:
        """Make tied parameters one tensor again (after loading)."""
        for name, source in self.tied_keys.items():
            owner, _, leaf = name.rpartition(".")
            source_owner, _, source_leaf = source.rpartition(".")
            setattr(self.get_submodule(owner), leaf, getattr(self.get_submodule(source_owner), source_leaf))

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str = "10GB", **_: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` in transformers' format."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False is not supported: diffusekit writes safetensors only")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.pop("_name_or_path", None)
        config["architectures"] = [type(self).__name__]
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(folder / "config.json", lambda f: f.write(text))
        tied = set(self.tied_keys)
        state = {k: v for k, v in self.state_dict().items() if k not in tied}
        save_weights(state, folder, base=WEIGHTS_NAME, variant=variant, max_shard_size=max_shard_size)


def _read_weights(folder: Path, variant: str | None) -> tuple[dict[str, torch.Tensor], Path]:
    try:
        path = find_weights(folder, variant=variant, use_safetensors=True, base=WEIGHTS_NAME)
    except FileNotFoundError:
        legacy = folder / (_PICKLE_NAME if variant is None else f"pytorch_model.{variant}.bin")
        if not legacy.is_file():
            raise FileNotFoundError(f"no weights file in {folder} (looked for {WEIGHTS_NAME} "
                                    f"{'variant ' + variant + ' ' if variant else ''}and {legacy.name})") from None
        return load_pickle(legacy), legacy
    return load_weights(path), path


def _clip(items: list[str], limit: int = 12) -> str:
    return "[" + ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") + "]"
