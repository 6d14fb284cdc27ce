"""Loading the transformers components of a pipeline folder.

The text encoders and tokenizers that pipelines use most (CLIP text, CLIP text with projection,
T5's encoder, CLIP's and T5's tokenizers) are diffusekit's own implementations of the same on-disk
format (:mod:`diffusekit.models.clip_text`, :mod:`diffusekit.models.t5_encoder`,
:mod:`diffusekit.tokenization`): a pipeline loads without importing transformers' modeling code. Other classes (image encoders, the safety
checker's CLIP vision model, ...) load through transformers unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: transformers class names -> (diffusekit module, class) standing in for them when a folder is loaded.
OWN_CLASSES = {
    "CLIPTextModel": ("diffusekit.models.clip_text", "CLIPTextModel"),
    "CLIPTextModelWithProjection": ("diffusekit.models.clip_text", "CLIPTextModelWithProjection"),
    "CLIPTokenizer": ("diffusekit.tokenization", "CLIPTokenizer"),
    "CLIPTokenizerFast": ("diffusekit.tokenization", "CLIPTokenizer"),
    "T5TokenizerFast": ("diffusekit.tokenization", "T5TokenizerFast"),
    "T5EncoderModel": ("diffusekit.models.t5_encoder", "T5EncoderModel"),
}


def own_class(class_name: str) -> type | None:
    """diffusekit's class for a transformers class name of ``model_index.json``, or None."""
    import importlib

    if class_name not in OWN_CLASSES:
        return None
    module, name = OWN_CLASSES[class_name]
    return getattr(importlib.import_module(module), name)


def load_transformers_component(component_cls: type, path: Path, torch_dtype: torch.dtype | None,
                                variant: str | None = None) -> Any:
    """``component_cls.from_pretrained(path)``, in ``torch_dtype`` for modules, with ``variant``
    weights where the folder has them (else its default weights)."""
    is_module = issubclass(component_cls, torch.nn.Module)
    if is_module and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        component_cls = _transformers_class(component_cls)
    options = {"dtype": torch_dtype} if torch_dtype is not None and is_module else {}
    if is_module and variant is not None and any(f".{variant}." in p.name for p in path.glob("*")):
        options["variant"] = variant
    return component_cls.from_pretrained(path, **options)


def _transformers_class(component_cls: type) -> type:
    """transformers' class of a folder that transformers saved with peft adapters only (``adapter_config.json``
    naming the base model): transformers loads the base model and the adapters."""
    import transformers

    found = getattr(transformers, component_cls.__name__, None)
    return found if isinstance(found, type) else component_cls
