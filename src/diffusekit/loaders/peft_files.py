"""LoRA files saved from peft adapters, loaded back as peft adapters (``model.load_lora_adapter``).

``save_lora_adapter`` of an adapter made by ``add_adapter(LoraConfig(...))`` writes its ``LoraConfig``
(``config.to_dict()``, with ``peft_type``) into the file's metadata. Such a file, loaded with the model-level
``load_lora_adapter``, comes back as what was saved: peft's layers, injected from that config (DoRA, LoRA biases
and rsLoRA included, trainable), and ``model.peft_config[name]``, which is what code written for the reference
reads (``get_peft_model_state_dict(model, adapter_name=...)``, ``model.peft_config``). Every other file loads
into diffusekit's own layers (:mod:`~diffusekit.loaders.lora_layers`).

The metadata is checked by building the ``LoraConfig``: a key peft does not know raises peft's ``TypeError``,
reworded to name the file. Keys of the file that reach no adapter tensor, and adapter tensors the file lacks,
raise :class:`~diffusekit.weights.WeightsError` naming them (``strict=False``: a warning naming them, the rest
loaded); nothing is left injected after an error.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..weights import WeightsError
from . import adapter_layers as adapters
from . import lora_layers as layers

logger = logging.getLogger(__name__)


def saved_peft_config(metadata: dict, source: str) -> Any | None:
    """The ``LoraConfig`` that ``metadata`` (unprefixed) describes when it was saved from a peft adapter (it has
    ``peft_type``) and peft is installed; else None. TypeError naming ``source`` when peft refuses a key."""
    if "peft_type" not in metadata:
        return None
    try:
        from peft import LoraConfig
    except ImportError:  # diffusekit's own layers take the tensors; the config is only read for the alphas
        return None
    if str(metadata["peft_type"]).upper() != "LORA":
        raise ValueError(f"{source}: the adapter metadata is a peft {metadata['peft_type']} config; "
                         "load_lora_adapter reads LoRA adapters only")
    try:
        return LoraConfig(**metadata)
    except TypeError as error:
        raise TypeError(f"{source}: the adapter metadata does not describe a peft LoRA adapter: the `LoraConfig` "
                        f"class could not be instantiated ({error})") from error


def inject_peft_adapter(model: nn.Module, config: Any, name: str) -> None:
    """Inject adapter ``name`` of ``config`` with peft; ``model.peft_config`` keeps the configs it had (peft's
    injection leaves only the new one there)."""
    from peft import inject_adapter_in_model

    configs = dict(adapters.peft_configs(model))
    config.base_model_name_or_path = None
    inject_adapter_in_model(config, model, name)
    model.__dict__["peft_config"] = {**configs, name: config}


def _without_name(keys: list[str], name: str) -> list[str]:
    """Keys as the file writes them: the adapter name peft puts in them taken out."""
    return sorted(k.replace(f".{name}.", ".").removesuffix(f".{name}") for k in keys)


def load_peft_adapter(model: nn.Module, state: dict, config: Any, source: str, name: str, strict: bool) -> None:
    """Inject adapter ``name`` of ``config`` into ``model`` with peft and fill it from ``state``; it becomes the
    model's only active adapter. Errors undo the injection."""
    from peft import set_peft_model_state_dict

    try:
        inject_peft_adapter(model, config, name)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
    except (ValueError, RuntimeError) as error:  # no target module / tensors of the wrong shape
        adapters.delete(model, [name])
        raise WeightsError(f"{source}: cannot load this peft LoRA into {type(model).__name__}: {error}") from error
    missing = [k for k in result.missing_keys if ".lora_" in k and (f".{name}." in k or k.endswith(f".{name}"))]
    problems = [f"{label}: {', '.join(_without_name(keys, name))}" for label, keys in
                (("keys that match no LoRA layer", result.unexpected_keys), ("LoRA tensors the file lacks", missing))
                if keys]
    if problems:
        message = f"{source}: {'; '.join(problems)}"
        if strict:
            adapters.delete(model, [name])
            raise WeightsError(message + " (pass strict=False to load the rest)")
        logger.warning("%s; loading the rest", message)
    layers.install_scale_hook(model)
    adapters.activate(model, [name])
