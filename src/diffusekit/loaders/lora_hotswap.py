"""LoRA hotswap: load, swap and unload adapters of a compiled denoiser without recompiling.

``pipe.enable_lora_hotswap(target_rank=R)`` (before ``pipe.compile()``) prepares the denoiser's
layers once (:func:`~diffusekit.loaders.lora_layers.prepare_hotswap`): each gets fixed-shape
buffers of rank ``R`` and a scale per rank held in a tensor. A forward pre-hook on the denoiser,
outside any compiled graph, copies the adapters in use into those buffers in place whenever they
change (a load, ``hotswap=True`` replacing an adapter, ``set_adapters`` weights, ``disable_lora``,
fusing, unloading: zeros), so the compiled graph stays valid. Which layers are prepared: the
``target_modules`` given (peft's rule: a list of names, each matching a module path or its end,
or one regular expression matching whole paths); without them, those of the adapters already
loaded, else every Linear and Conv2d layer of the denoiser (each then pays a rank-``R`` branch).

LoRA call scales (``cross_attention_kwargs={"scale": s}``) under compile: a compiled graph cannot
read the context variable that eager layers read, so each prepared layer also has a 0-d call-scale
buffer that its compiled forward multiplies the branch by. ``lora_layers.compiled_call_scale`` writes ``s``
(1.0 without a scale) into them before a compiled forward (the scale hook does it for a compiled
denoiser, the whole-step loop for its compiled step) and holds the model's lock until the forward
returns: threads sharing the model take turns, so none runs with another call's scale. Writing
happens only when the value changes, in place (no recompile); kernels are ordered on the stream the
calls share (the default one). The buffers keep the last value; every compiled call writes its own
first, so nothing is restored.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Literal

from torch import nn

from . import lora_layers as layers

logger = logging.getLogger(__name__)

#: Attribute of a prepared model: ``(target rank, {module path: layer})``.
HOTSWAP_ATTRIBUTE = layers.HOTSWAP_ATTRIBUTE
CHECKS = ("error", "warn", "ignore")


def _targets(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, nn.Module]:
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1}
    if target_modules is None:
        loaded = {n: m for n, m in found.items() if isinstance(m, layers.LoraLayer) and m.lora_adapters}
        return loaded or found
    if isinstance(target_modules, str):
        chosen = {n: m for n, m in found.items() if re.fullmatch(target_modules, n)}
    else:
        chosen = {n: m for n, m in found.items() if any(n == t or n.endswith(f".{t}") for t in target_modules)}
    if not chosen:
        raise ValueError(f"enable_lora_hotswap: target_modules {target_modules!r} match no Linear or ungrouped Conv2d layer "
                         f"of {type(model).__name__}")
    return chosen


def _check_state(model: nn.Module, check_compiled: str) -> None:
    if check_compiled not in CHECKS:
        raise ValueError(f"check_compiled should be one of {CHECKS}, got {check_compiled!r}")
    from ..pipelines.compile import COMPILED_ATTRIBUTE

    if getattr(model, COMPILED_ATTRIBUTE, None) is not None or layers.lora_layers(model):
        message = (f"{type(model).__name__} is already compiled or has LoRA adapters: call enable_lora_hotswap "
                   "before compile() and before loading the first adapter (preparing now recompiles once)")
        if check_compiled == "error":
            raise RuntimeError(message)
        if check_compiled == "warn":
            logger.warning(message)


def enable_lora_hotswap(model: nn.Module, target_rank: int = 128,
                        check_compiled: Literal["error", "warn", "ignore"] = "error",
                        target_modules: list[str] | str | None = None) -> None:
    """Prepare ``model``'s layers for hotswapping adapters of rank up to ``target_rank`` (module docstring)."""
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
    prepared = hotswap_layers(model)
    if prepared is not None:
        if prepared[0] != target_rank:
            raise ValueError(f"{type(model).__name__} is already prepared for LoRA hotswap with target_rank "
                             f"{prepared[0]}, not {target_rank}")
    else:
        _check_state(model, check_compiled)
    targets = _targets(model, target_modules)
    for name, module in targets.items():
        layers.prepare_hotswap(module, target_rank, f"{type(model).__name__}.{name}")
    setattr(model, HOTSWAP_ATTRIBUTE, (target_rank, {**(prepared or (0, {}))[1], **targets}))
    if not getattr(model, "_lora_hotswap_hook", None):
        model._lora_scale_lock, model._lora_call_scale = threading.RLock(), 1.0
        model._lora_hotswap_hook = model.register_forward_pre_hook(_sync_before_call)


def hotswap_layers(model: nn.Module | None) -> tuple[int, dict[str, nn.Module]] | None:
    """``(target rank, prepared layers by path)`` of a prepared model, else None."""
    return getattr(model, HOTSWAP_ATTRIBUTE, None)


def _sync_before_call(model: nn.Module, args: tuple) -> None:
    sync_hotswap(model)


def sync_hotswap(model: nn.Module) -> None:
    """Mirror a prepared model's adapters into its layers' buffers (what its pre-hook does; nothing
    for a model not prepared)."""
    prepared = hotswap_layers(model)
    for name, layer in (prepared or (0, {}))[1].items():
        layers.sync_slot(layer, f"{type(model).__name__}.{name}")


def check_targets(model: nn.Module, targets: list[tuple[nn.Module, layers.Adapter]], source: str) -> None:
    """ValueError naming ``source`` and the layer when a prepared ``model`` cannot take the planned adapters:
    a layer that was not prepared, or a rank above the target rank."""
    prepared = hotswap_layers(model)
    if prepared is None:
        return
    rank, known = prepared
    names = {id(m): n for n, m in model.named_modules()}
    for module, adapter in targets:
        name = names.get(id(module), "?")
        if not isinstance(module, layers.HotswapLoraLayer):
            raise ValueError(f"{source}: the LoRA targets {type(model).__name__}.{name}, which enable_lora_hotswap "
                             f"did not prepare ({len(known)} layers prepared); pass it in target_modules")
        if adapter.down.shape[0] > rank:
            raise ValueError(f"{source}: the LoRA on {type(model).__name__}.{name} has rank {adapter.down.shape[0]}, "
                             f"above the hotswap target_rank {rank}; call enable_lora_hotswap with a larger one")
