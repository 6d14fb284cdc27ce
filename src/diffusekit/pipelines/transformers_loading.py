"""Loading transformers components of a pipeline folder, with a fast path for CLIP text encoders.

transformers' own ``from_pretrained`` spends most of its time on generic machinery (weight
converters, a thread pool, device maps). For a plain single-file safetensors CLIP text encoder we
build the module without weight initialisation and assign the file's tensors after a strict key
and shape check, which gives the same module (same tensors, config, attention implementation,
eval mode) in about a third of the time. Anything else goes through transformers unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..weights import WeightsError, load_safetensors

#: transformers classes whose folders may take the fast path (no tied or fp32-kept weights, and
#: no floating-point buffers outside the state dict).
FAST_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_WEIGHTS_NAME = "model.safetensors"


def load_transformers_component(component_cls: type, path: Path, torch_dtype: torch.dtype | None,
                                variant: str | None = None) -> Any:
    """``component_cls.from_pretrained(path, dtype=torch_dtype, variant=variant)``, or the equivalent fast
    path; a folder without ``variant`` weights loads its default weights."""
    is_module = issubclass(component_cls, torch.nn.Module)
    if is_module and variant is None and component_cls.__name__ in FAST_CLASSES:
        model = _load_fast(component_cls, path, torch_dtype)
        if model is not None:
            return model
    options = {"dtype": torch_dtype} if torch_dtype is not None and is_module else {}
    if is_module and variant is not None and any(f".{variant}." in p.name for p in path.glob("*")):
        options["variant"] = variant
    return component_cls.from_pretrained(path, **options)


def _load_fast(component_cls: type, path: Path, torch_dtype: torch.dtype | None):
    """The model, or None where the folder needs transformers' general loader."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return None
    weights = path / _WEIGHTS_NAME
    if not weights.is_file():
        return None
    config = component_cls.config_class.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        return None
    with no_init_weights():
        model = component_cls(config)
    try:
        state = load_safetensors(weights)
    except WeightsError:
        return None  # transformers reports its own error
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        return None  # renamed or legacy keys: transformers knows the conversions
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    from ..models.modeling import assign_tensors

    assign_tensors(model, state)
    floating = [v.dtype for v in state.values() if v.is_floating_point()]
    if floating:
        model.config.dtype = floating[0]
    model.config._name_or_path = str(path)
    return model.eval()
