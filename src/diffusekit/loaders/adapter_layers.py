"""Adapter operations on a model's LoRA layers of both kinds: diffusekit's own
(:mod:`~diffusekit.loaders.lora_layers`, made from LoRA files) and peft's (made by
``model.add_adapter(LoraConfig(...))``, see :mod:`~diffusekit.loaders.peft_adapters` for why peft).

The call scale of both kinds is in :mod:`~diffusekit.loaders.lora_layers` (``install_scale_hook``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import lora_layers as layers
from .lora_layers import peft_layers

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
#: safetensors metadata key holding the adapter config JSON.
METADATA_KEY = "lora_adapter_metadata"


# -- layers of both kinds ---------------------------------------------------------------------------

def peft_configs(model: nn.Module) -> dict:
    """``model.peft_config`` (adapter name -> peft config), or {}."""
    return model.__dict__.get("peft_config") or {}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, both kinds, in loading order."""
    names = [n for layer in layers.lora_layers(model) for n in layer.lora_adapters]
    names += list(peft_configs(model))
    names += [n for layer in peft_layers(model) for n in getattr(layer, "lora_A", {})]
    return list(dict.fromkeys(names))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in use (own layers: unless disabled; peft layers: as peft reports them)."""
    names = [n for layer in layers.lora_layers(model) if layer.lora_enabled for n in layer.lora_active]
    names += [n for layer in peft_layers(model) for n in layer.active_adapters]
    return list(dict.fromkeys(names))


def fused_adapters(model: nn.Module) -> set[str]:
    """Names of the adapters fused into some weight of ``model``."""
    names = {n for layer in layers.lora_layers(model) for n in layer.lora_fused}
    return names | {n for layer in peft_layers(model) for n in layer.merged_adapters}


#: A weight for one adapter: one number, or numbers by module-name part (``block_weights``).
Weight = float | dict[str, float]


def _layer_weight(weight: Weight, module_name: str) -> float:
    if not isinstance(weight, dict):
        return float(weight)
    return next((float(w) for part, w in weight.items() if part in module_name), 1.0)


def activate(model: nn.Module, names: list[str], weights: list[Weight] | None = None) -> None:
    """Use only ``names`` in ``model``; with ``weights`` (one per name), each times its weight."""
    for module_name, layer in model.named_modules():
        if isinstance(layer, layers.LoraLayer):
            layer.lora_active = tuple(n for n in names if n in layer.lora_adapters)
            layer.lora_weights.update({n: _layer_weight(w, module_name) for n, w in zip(names, weights or ())})
    tuned = set(map(id, peft_layers(model)))
    for module_name, layer in model.named_modules():
        if id(layer) in tuned:
            layer.set_adapter(names)
            for name, weight in zip(names, weights or ()):
                layer.set_scale(name, _layer_weight(weight, module_name))


def block_weights(unet: nn.Module, scales: dict, default: float = 1.0) -> dict[str, float]:
    """UNet block weights as the reference takes them (``{"down": 0.5, "mid": 1.0, "up": {"block_1": [1, 0, 1]}}``)
    expanded to weights by attention module (``"up_blocks.1.attentions.2": 0.0``)."""
    if unknown := set(scales) - {"down", "mid", "up"}:
        raise ValueError(f"block weights take the keys 'down', 'mid' and 'up', got {sorted(unknown)}")
    mid = scales.get("mid", default)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"Expected 1 scales for mid, got {len(mid)}.")
        mid = mid[0]
    result = {"mid_block.attentions.0": float(mid)}
    for side in ("down", "up"):
        blocks = {i: len(b.attentions) for i, b in enumerate(getattr(unet, f"{side}_blocks"))
                  if getattr(b, "attentions", None) is not None}
        value = scales.get(side, default)
        if isinstance(value, dict) and (extra := set(value) - {f"block_{i}" for i in blocks}):
            raise ValueError(f"Can't set lora scale for layer {side}.{sorted(extra)[0]}. It either doesn't exist in "
                             f"this unet or it has no attentions.")
        for i, count in blocks.items():
            block = value.get(f"block_{i}", default) if isinstance(value, dict) else value
            values = block if isinstance(block, list) else [block]
            values = values * count if len(values) == 1 else values
            if len(values) != count:
                raise ValueError(f"Expected {count} scales for {side}.block_{i}, got {len(values)}.")
            result.update({f"{side}_blocks.{i}.attentions.{j}": float(v) for j, v in enumerate(values)})
    return result


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off (they stay loaded)."""
    for layer in layers.lora_layers(model):
        layer.lora_enabled = enabled
    for layer in peft_layers(model):
        layer.enable_adapters(enabled)


def delete(model: nn.Module, names: list[str]) -> None:
    """Remove adapters ``names`` from ``model`` (a fused own adapter must be unfused first)."""
    for layer in layers.lora_layers(model):
        for name in names:
            if name in layer.lora_fused:
                raise ValueError(f"adapter {name!r} is fused; call unfuse_lora() before deleting it")
            layers.remove_adapter(layer, name)
    for layer in peft_layers(model):
        for name in names:
            if name in getattr(layer, "lora_A", {}):
                layer.delete_adapter(name)
    _unwrap(model, [layer for layer in peft_layers(model) if not getattr(layer, "lora_A", None)])
    configs = peft_configs(model)
    for name in names:
        configs.pop(name, None)
    if not configs:
        _drop_peft_config(model)
    drop_scale_hook_if_unused(model)


def fuse(model: nn.Module, scale: float = 1.0, safe: bool = False, names: list[str] | None = None) -> None:
    """Add the active adapters (or ``names``) times ``scale`` into ``model``'s weights."""
    for layer in layers.lora_layers(model):
        layer.fuse(list(names) if names is not None else list(layer.lora_active), scale, safe)
    for layer in peft_layers(model):
        layer.scale_layer(scale)
        layer.merge(safe_merge=safe, adapter_names=names)


def unfuse(model: nn.Module) -> None:
    """Put back the weights from before fusing."""
    for layer in layers.lora_layers(model):
        layer.unfuse()
    for layer in peft_layers(model):
        layer.unmerge()


def unload(model: nn.Module) -> None:
    """Remove every adapter and LoRA layer of ``model``; fused adapters stay in the weights."""
    for layer in layers.lora_layers(model):
        layers.remove_lora(layer)
    _unwrap(model, peft_layers(model))
    _drop_peft_config(model)
    drop_scale_hook_if_unused(model)


def _drop_peft_config(model: nn.Module) -> None:
    """Forget ``model.peft_config``; a transformers model also forgets that it had one (its ``add_adapter``
    reads ``peft_config`` while that flag is set)."""
    model.__dict__.pop("peft_config", None)
    if model.__dict__.get("_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def _unwrap(model: nn.Module, tuned: list[nn.Module]) -> None:
    """Put the base layer of each peft layer in ``tuned`` back in its place (its weights as they are now)."""
    ids = set(map(id, tuned))
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in ids:
                setattr(parent, child_name, child.get_base_layer())


def move_adapters(model: nn.Module, names: list[str], device: torch.device | str | int) -> None:
    """Move the tensors of adapters ``names`` to ``device``."""
    for layer in layers.lora_layers(model):
        for name in names:
            if name in layer.lora_adapters:
                adapter = layer.lora_adapters[name]
                adapter.down, adapter.up = adapter.down.to(device), adapter.up.to(device)
                if adapter.up_bias is not None:
                    adapter.up_bias = adapter.up_bias.to(device)
    for layer in peft_layers(model):
        for name in names:
            for store in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})):
                if name in store:
                    store[name].to(device)


def drop_scale_hook_if_unused(model: nn.Module) -> None:
    """Remove the call-scale hook of ``model`` when it has no LoRA layer left."""
    if not layers.lora_layers(model) and not peft_layers(model):
        layers.remove_scale_hook(model)


def adapter_state_dict(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of adapter ``name``: ``<module>.lora_A.weight`` / ``lora_B.weight`` keys and the
    peft-style config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``)."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, layers.LoraLayer) and name in module.lora_adapters:
            adapter = module.lora_adapters[name]
            state[f"{module_name}.lora_A.weight"] = adapter.down
            state[f"{module_name}.lora_B.weight"] = adapter.up
            if adapter.up_bias is not None:
                state[f"{module_name}.lora_B.bias"] = adapter.up_bias
            ranks[module_name] = adapter.down.shape[0]
            alphas[module_name] = adapter.scale * adapter.down.shape[0]
    config = peft_configs(model).get(name)
    if config is not None:
        from peft.utils import get_peft_model_state_dict

        state.update(get_peft_model_state_dict(model, adapter_name=name))
        return state, config.to_dict()
    return state, _own_metadata(ranks, alphas)


def _own_metadata(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    rank = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 0
    alpha = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else 0.0
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {k: v for k, v in ranks.items() if v != rank},
            "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}


def write_lora_file(state: dict[str, torch.Tensor], metadata: dict, folder: Path, weight_name: str | None,
                    safe_serialization: bool) -> Path:
    """Save a LoRA state dict (safetensors with the metadata JSON, or a torch pickle) into ``folder``."""
    from ..weights import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME))
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    if safe_serialization:
        meta = {"format": "pt"}
        if metadata:
            meta[METADATA_KEY] = json.dumps(_jsonable(metadata), indent=2, sort_keys=True)
        with open(path, "wb") as f:
            write_safetensors(tensors, f, meta)
    else:
        torch.save(tensors, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, tuple, list)):
        return [_jsonable(v) for v in (sorted(value, key=str) if isinstance(value, set) else value)]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
