"""Model-level adapters: the reference's adapter API on every diffusekit model (:class:`PeftAdapterMixin`).

A model can carry two kinds of LoRA layers:

* diffusekit's own (:mod:`~diffusekit.loaders.lora_layers`), made from LoRA files by
  ``model.load_lora_adapter(...)`` and ``pipe.load_lora_weights(...)``;
* peft's, made by ``model.add_adapter(LoraConfig(...))``. A ``LoraConfig`` describes a *trainable*
  adapter (init schemes, dropout, DoRA, rsLoRA), and code written for the reference reads the result
  with peft's own tools (``isinstance(m, BaseTunerLayer)``, ``get_peft_model_state_dict(model)``,
  ``model.peft_config``; diffusers' LoRA tests do all three), so peft injects those layers, as in
  the reference. A file saved from such an adapter (its metadata is the ``LoraConfig``) comes back as
  one through ``model.load_lora_adapter`` (:mod:`~diffusekit.loaders.peft_files`). peft is imported
  only on these paths.

Every other method works on both kinds (:mod:`~diffusekit.loaders.adapter_layers`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import lora_layers as layers
from .adapter_layers import (active_adapters, activate, adapter_names, adapter_state_dict, block_weights, delete,
                             fuse, set_enabled, unfuse, unload, write_lora_file)
from .lora import LORA_WEIGHT_NAMES, check_adapter_name, load_into_model, read_lora_file
from .peft_files import inject_peft_adapter, load_peft_adapter, saved_peft_config
from ..hub import split_hub_kwargs


def _names(adapter_names: str | list[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


class PeftAdapterMixin:
    """Adapter methods of the reference's models (``add_adapter``, ``set_adapters``, ``fuse_lora`` ...)."""

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """Add a new (trainable) adapter described by a peft config, e.g. ``LoraConfig``; it becomes the active one."""
        try:
            from peft import PeftConfig
        except ImportError:
            raise ImportError("add_adapter needs peft (`pip install peft`)") from None
        if not isinstance(adapter_config, PeftConfig):
            raise ValueError(f"adapter_config should be an instance of PeftConfig, got {type(adapter_config).__name__}")
        if adapter_name in adapter_names(self):
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        inject_peft_adapter(self, adapter_config, adapter_name)
        layers.install_scale_hook(self)
        self.set_adapter(adapter_name)

    def _check_loaded(self, names: list[str]) -> None:
        loaded = adapter_names(self)
        if not loaded:
            raise ValueError("No adapter loaded. Please load an adapter first.")
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ValueError(f"Following adapter(s) could not be found: {', '.join(missing)}. "
                             f"Current loaded adapters are: {loaded}")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Use only the named adapter(s), at their current weights."""
        names = _names(adapter_name)
        self._check_loaded(names)
        activate(self, names)

    def set_adapters(self, adapter_names: str | list[str], weights: float | list | None = None) -> None:
        """Use only ``adapter_names``, each times its weight (None: 1.0)."""
        names = _names(adapter_names)
        self._check_loaded(names)
        weights = weights if isinstance(weights, list) else [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of their weights "
                             f"{len(weights)}.")
        if any(isinstance(w, dict) for w in weights) and not hasattr(self, "down_blocks"):
            raise ValueError(f"weights by block (dicts) are for UNets; {type(self).__name__} takes one number per adapter")
        activate(self, names, [block_weights(self, w) if isinstance(w, dict) else 1.0 if w is None else w
                               for w in weights])

    def active_adapters(self) -> list[str]:
        """Names of the adapters in use."""
        self._check_loaded([])
        return active_adapters(self)

    def disable_adapters(self) -> None:
        """Run the base model only (adapters stay loaded)."""
        self._check_loaded([])
        set_enabled(self, False)

    def enable_adapters(self) -> None:
        """Use the active adapters again after :meth:`disable_adapters`."""
        self._check_loaded([])
        set_enabled(self, True)

    def disable_lora(self) -> None:
        set_enabled(self, False)

    def enable_lora(self) -> None:
        set_enabled(self, True)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove the named adapters."""
        delete(self, _names(adapter_names))

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Add the active adapters (or ``adapter_names``) times ``lora_scale`` into the weights."""
        fuse(self, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        unfuse(self)

    def unload_lora(self) -> None:
        """Remove every adapter and LoRA layer (fused adapters stay in the weights)."""
        unload(self)

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                          prefix: str | None = "transformer", adapter_name: str | None = None,
                          weight_name: str | None = None, strict: bool = True, **kwargs: Any) -> None:
        """Load a LoRA file, folder, Hub repo or state dict into this model as ``adapter_name``.

        Keys starting with ``prefix + "."`` are used (prefix stripped); with ``prefix=None``, every key.
        A file saved from a peft adapter (its metadata, or ``metadata=``, a ``LoraConfig`` with ``peft_type``)
        becomes that peft adapter with ``peft_config[adapter_name]``, unless the model is prepared for hotswap;
        other files load into diffusekit's layers. Keys that reach no layer, and adapter tensors a peft file
        lacks, raise WeightsError naming them (``strict=False``: a warning naming them).
        """
        hub = split_hub_kwargs(kwargs)
        given_metadata = kwargs.pop("metadata", None)
        for ignored in ("low_cpu_mem_usage", "network_alphas", "_pipeline"):
            kwargs.pop(ignored, None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        if weight_name is None and use_safetensors is not None:  # only that format's file name
            weight_name = LORA_WEIGHT_NAMES[0 if use_safetensors else 1]
        if kwargs.pop("hotswap", False):
            raise ValueError("hotswap=True is not supported; delete the adapter and load the new one")
        if kwargs:
            raise TypeError(f"load_lora_adapter got unexpected arguments {sorted(kwargs)}")
        state, metadata, source = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name, **hub)
        if prefix is not None:
            state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
            if not state:
                raise ValueError(f"{source}: no key starts with the prefix {prefix!r}")
        name = adapter_name or f"default_{len(adapter_names(self))}"
        metadata = given_metadata if given_metadata is not None else _flat_metadata(metadata, prefix)
        config = None if getattr(self, layers.HOTSWAP_ATTRIBUTE, None) else saved_peft_config(metadata, source)
        if config is None:
            load_into_model(self, state, metadata, source, name, strict)
        else:
            check_adapter_name(name, adapter_names(self))
            load_peft_adapter(self, state, config, source, name, strict)

    def save_lora_adapter(self, save_directory: str | os.PathLike, adapter_name: str = "default",
                          upcast_before_saving: bool = False, safe_serialization: bool = True,
                          weight_name: str | None = None) -> None:
        """Write adapter ``adapter_name`` in the reference's layout (``<module>.lora_A.weight`` ...)."""
        if adapter_name not in adapter_names(self):
            raise ValueError(f"Adapter name {adapter_name} not found in the model.")
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        state, metadata = adapter_state_dict(self, adapter_name)
        if upcast_before_saving:
            state = {k: v.float() for k, v in state.items()}
        write_lora_file(state, metadata, Path(save_directory), weight_name, safe_serialization)


def _flat_metadata(metadata: dict, prefix: str | None) -> dict:
    """Adapter metadata as the loader reads it (``"<component>.lora_alpha"`` ...)."""
    if prefix is not None and any(k.startswith(f"{prefix}.") for k in metadata):
        return {k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    return metadata
