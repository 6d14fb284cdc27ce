"""LoRA-aware ``nn.Linear`` / ``nn.Conv2d`` layers, injected in place.

Why not peft for LoRA files: diffusekit only needs inference-time adapters on Linear and Conv2d layers, and a small
layer of its own keeps loading a LoRA at a few milliseconds, keeps the model's state dict (and so
``save_pretrained``) unchanged, makes unloading exact (the original weight tensors are never
written to) and keeps per-call scales apart between threads. Adapters made from a peft
``LoraConfig`` (``model.add_adapter``) are peft's layers; see :mod:`~diffusekit.loaders.peft_adapters`.

How: :func:`add_adapter` switches an existing layer's class to a subclass that mixes in
:class:`LoraLayer` (``module.__class__`` swap: same object, same parameters, same state-dict keys,
``isinstance(layer, nn.Linear)`` still holds) and stores the adapter's tensors in plain dicts that
``.to()`` / ``.half()`` move along (``_apply``). The forward adds, per active adapter,
``up(down(x)) * scale``, where ``scale = alpha / rank * adapter weight * call scale``:

* ``alpha / rank`` comes from the file (kohya ``.alpha`` keys or peft metadata; alpha = rank when absent);
* the adapter weight is set by ``set_adapters``;
* the call scale is ``cross_attention_kwargs={"scale": s}`` for the call being made
  (:func:`install_scale_hook`, :func:`lora_call_scale`). It lives in a context variable, not on the
  layers, so calls made at the same time in other threads each see their own scale.

Fusing writes ``W + scale * up @ down`` as a *new* tensor and keeps the original, so unfusing restores
it bit for bit. :func:`remove_lora` switches the class back.

Hotswap (:mod:`~diffusekit.loaders.lora_hotswap`): :func:`prepare_hotswap` gives a layer the class
:class:`HotswapLoraLayer` once, with fixed-shape non-persistent buffers (rank padded to a target
rank, a scale per rank as a tensor, a 0-d call scale for compiled calls). Its forward reads only those
buffers, so loading, swapping,
reweighting and unloading adapters (:func:`sync_slot` copies them in place) change no class,
shape or Python constant that a compiled graph depends on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: Attribute of a model prepared by ``lora_hotswap.enable_lora_hotswap``: ``(target rank, {path: layer})``.
HOTSWAP_ATTRIBUTE = "_lora_hotswap"
#: Keyword arguments of a model's forward that may carry ``{"scale": s}`` for the LoRA layers.
SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
#: The call scale of LoRA layers, by ``id(layer)``, in the running call (1.0 for layers not in it).
_CALL_SCALES: ContextVar[Mapping[int, float]] = ContextVar("diffusekit_lora_call_scales",
                                                           default=MappingProxyType({}))
#: What undoes the scales that :func:`install_scale_hook`'s pre-hooks set, innermost last.
_HOOK_TOKENS: ContextVar[tuple[contextlib.ExitStack | None, ...]] = ContextVar("diffusekit_lora_hook_tokens",
                                                                     default=())


@dataclass
class Adapter:
    """One adapter of one layer: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), optional
    ``up_bias`` (out,), and ``scale`` = alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    up_bias: torch.Tensor | None = None


class LoraLayer:
    """Mixed into a Linear/Conv2d (subclass) by :func:`add_adapter`; see the module docstring."""

    lora_adapters: dict[str, Adapter]
    lora_weights: dict[str, float]
    lora_active: tuple[str, ...]
    lora_fused: dict[str, float]
    lora_original: tuple[torch.Tensor, torch.Tensor | None] | None

    def _init_lora(self) -> None:
        self.lora_adapters, self.lora_weights, self.lora_fused = {}, {}, {}
        self.lora_active, self.lora_original = (), None
        self.lora_enabled = True

    def lora_scale(self, name: str) -> float:
        return self.lora_adapters[name].scale * self.lora_weights.get(name, 1.0)

    def lora_delta(self, name: str) -> torch.Tensor:
        """``up @ down`` shaped like the layer's weight (no scale)."""
        adapter = self.lora_adapters[name]
        if adapter.down.ndim == 2:
            return adapter.up @ adapter.down
        return torch.einsum("or,rikl->oikl", adapter.up.flatten(1), adapter.down)

    def _lora_branch(self, x: torch.Tensor, adapter: Adapter) -> torch.Tensor:
        if isinstance(self, nn.Conv2d):
            hidden = self._conv_forward(x, adapter.down, None)
            return F.conv2d(hidden, adapter.up, adapter.up_bias)
        return F.linear(F.linear(x, adapter.down), adapter.up, adapter.up_bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        # torch.compile cannot read context variables; compiled plain LoRA layers refuse call scales (install_scale_hook)
        call_scale = 1.0 if torch.compiler.is_compiling() else _CALL_SCALES.get().get(id(self), 1.0)
        if not self.lora_enabled or call_scale == 0:
            return out
        for name in self.lora_active:
            if name in self.lora_fused or name not in self.lora_adapters:
                continue
            adapter = self.lora_adapters[name]
            x_cast = x.to(adapter.down.dtype)
            branch = self._lora_branch(x_cast, adapter)
            out = out + (branch * (self.lora_scale(name) * call_scale)).to(out.dtype)
        return out

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for adapter in self.lora_adapters.values():
            adapter.down, adapter.up = fn(adapter.down), fn(adapter.up)
            if adapter.up_bias is not None:
                adapter.up_bias = fn(adapter.up_bias)
        if self.lora_original is not None:
            weight, bias = self.lora_original
            self.lora_original = (fn(weight), None if bias is None else fn(bias))
        return self

    # -- fusing ---------------------------------------------------------------------------------

    @torch.no_grad()
    def fuse(self, names: list[str], multiplier: float = 1.0, safe: bool = False) -> list[str]:
        """Add the named active, unfused adapters to the weight (times ``multiplier``); returns them."""
        todo = [n for n in names if n in self.lora_adapters and n not in self.lora_fused]
        if not todo:
            return []
        weight = self.weight.data
        bias = None if self.bias is None else self.bias.data
        new_weight, new_bias = weight, bias
        for name in todo:
            scale = self.lora_scale(name) * multiplier
            new_weight = new_weight + (self.lora_delta(name) * scale).to(weight.dtype)
            up_bias = self.lora_adapters[name].up_bias
            if up_bias is not None:
                if new_bias is None:
                    raise ValueError("cannot fuse a LoRA bias into a layer without bias")
                new_bias = new_bias + (up_bias * scale).to(new_bias.dtype)
        if safe and not torch.isfinite(new_weight).all():
            raise ValueError(f"fusing LoRA adapters {todo} gives non-finite weights; not fused")
        if self.lora_original is None:
            self.lora_original = (weight, bias)
        self.weight.data = new_weight
        if new_bias is not None and self.bias is not None:
            self.bias.data = new_bias
        self.lora_fused.update({n: multiplier for n in todo})
        return todo

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the weights from before the first fuse (exactly)."""
        if self.lora_original is None:
            return
        weight, bias = self.lora_original
        self.weight.data = weight
        if bias is not None:
            self.bias.data = bias
        self.lora_original = None
        self.lora_fused = {}


_LORA_ATTRIBUTES = ("lora_adapters", "lora_weights", "lora_active", "lora_fused", "lora_original", "lora_enabled")


class HotswapLoraLayer(LoraLayer):
    """A LoRA layer whose forward adds only its fixed slot: ``up(down(x) * scale_per_rank) + bias``.

    ``lora_adapters`` and the rest keep the bookkeeping; :func:`sync_slot` mirrors the active,
    enabled, unfused adapters into the buffers (side by side along the rank, zeros elsewhere)."""

    lora_hotswap_down: torch.Tensor
    lora_hotswap_up: torch.Tensor
    lora_hotswap_bias: torch.Tensor
    lora_hotswap_scale: torch.Tensor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super(LoraLayer, self).forward(x, *args, **kwargs)
        down, up, scale = self.lora_hotswap_down, self.lora_hotswap_up, self.lora_hotswap_scale
        x_cast = x.to(down.dtype)
        if isinstance(self, nn.Conv2d):
            hidden = self._conv_forward(x_cast, down, None) * scale.view(-1, 1, 1)
            branch = F.conv2d(hidden, up, self.lora_hotswap_bias)
        else:
            branch = F.linear(F.linear(x_cast, down) * scale, up, self.lora_hotswap_bias)
        if torch.compiler.is_compiling():  # written by compiled_call_scale
            branch = branch * self.lora_hotswap_call_scale
        else:
            call_scale = _CALL_SCALES.get().get(id(self), 1.0)
            branch = branch if call_scale == 1.0 else branch * call_scale
        return out + branch.to(out.dtype)


_LORA_CLASSES: dict[tuple[type, type], type] = {}


def _lora_class(cls: type, mixin: type = LoraLayer) -> type:
    if (cls, mixin) not in _LORA_CLASSES:
        prefix = "HotswapLora" if mixin is HotswapLoraLayer else "Lora"
        _LORA_CLASSES[cls, mixin] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"_lora_base_class": cls})
    return _LORA_CLASSES[cls, mixin]


def _slot_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``down`` and ``up`` of a rank-``rank`` adapter on ``module``."""
    weight_shape = base_shape(module)
    if isinstance(module, nn.Linear):
        return (rank, weight_shape[1]), (weight_shape[0], rank)
    return (rank, *weight_shape[1:]), (weight_shape[0], rank, 1, 1)


def prepare_hotswap(module: nn.Module, rank: int, where: str) -> None:
    """Make ``module`` (Linear/Conv2d, with or without adapters) a :class:`HotswapLoraLayer` of ``rank``."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "groups", 1) != 1:
        raise ValueError(f"{where}: only Linear and ungrouped Conv2d layers can be prepared for LoRA hotswap")
    if isinstance(module, HotswapLoraLayer):
        if module.lora_hotswap_rank != rank:
            raise ValueError(f"{where} is prepared for LoRA hotswap with rank {module.lora_hotswap_rank}, not {rank}")
        return
    state = {k: module.__dict__[k] for k in _LORA_ATTRIBUTES if k in module.__dict__}
    module.__class__ = _lora_class(getattr(module, "_lora_base_class", type(module)), HotswapLoraLayer)
    module._init_lora()
    module.__dict__.update(state)
    ref = module.weight
    make = functools.partial(torch.zeros, device=ref.device, dtype=ref.dtype)
    down_shape, up_shape = _slot_shapes(module, rank)
    for name, shape in (("down", down_shape), ("up", up_shape), ("bias", (up_shape[0],)), ("scale", (rank,))):
        module.register_buffer(f"lora_hotswap_{name}", make(shape), persistent=False)
    module.register_buffer("lora_hotswap_call_scale", torch.ones((), device=ref.device, dtype=ref.dtype),
                           persistent=False)
    module.lora_hotswap_rank, module.lora_hotswap_seen = rank, None
    sync_slot(module, where)


def _slot_signature(layer: LoraLayer) -> tuple:
    adapters = tuple((n, id(a.down), id(a.up), id(a.up_bias), a.scale) for n, a in layer.lora_adapters.items())
    return (layer.lora_enabled, layer.lora_active, tuple(layer.lora_weights.items()), tuple(layer.lora_fused),
            adapters)


@torch.no_grad()
def sync_slot(layer: HotswapLoraLayer, where: str) -> None:
    """Copy the layer's active, enabled, unfused adapters into its buffers in place (nothing when unchanged)."""
    signature = _slot_signature(layer)
    if signature == layer.lora_hotswap_seen:
        return
    names = [n for n in layer.lora_active if n in layer.lora_adapters and n not in layer.lora_fused]
    names = names if layer.lora_enabled else []
    ranks = [layer.lora_adapters[n].down.shape[0] for n in names]
    if sum(ranks) > layer.lora_hotswap_rank:
        raise ValueError(f"{where}: the active LoRA adapters {names} have ranks {ranks} (together {sum(ranks)}), "
                         f"above the hotswap target_rank {layer.lora_hotswap_rank}")
    for buffer in (layer.lora_hotswap_down, layer.lora_hotswap_up, layer.lora_hotswap_bias, layer.lora_hotswap_scale):
        buffer.zero_()
    start = 0
    for name, rank in zip(names, ranks):
        adapter, scale = layer.lora_adapters[name], layer.lora_scale(name)
        layer.lora_hotswap_down[start:start + rank].copy_(adapter.down)
        layer.lora_hotswap_up[:, start:start + rank].copy_(adapter.up)
        layer.lora_hotswap_scale[start:start + rank] = scale
        if adapter.up_bias is not None:
            layer.lora_hotswap_bias.add_(adapter.up_bias.to(layer.lora_hotswap_bias) * scale)
        start += rank
    layer.lora_hotswap_seen = signature


def base_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape)


def check_adapter_shapes(module: nn.Module, down: torch.Tensor, up: torch.Tensor, where: str):
    """``down``/``up`` reshaped for ``module`` (2-D <-> 1x1 conv); ValueError naming ``where`` when they do not fit."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{where}: LoRA targets {type(module).__name__}; only Linear and Conv2d layers take LoRA")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"{where}: LoRA on grouped convolutions is not supported")
    down_shape, up_shape = _slot_shapes(module, down.shape[0])
    if down.numel() != _numel(down_shape) or up.numel() != _numel(up_shape):
        raise ValueError(f"{where}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a layer with "
                         f"weight {base_shape(module)} (expected {down_shape} / {up_shape})")
    return down.reshape(down_shape), up.reshape(up_shape)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def add_adapter(module: nn.Module, name: str, adapter: Adapter) -> None:
    """Give ``module`` (Linear/Conv2d, shapes already checked) the adapter ``name``, cast to its weight."""
    if not isinstance(module, LoraLayer):
        module.__class__ = _lora_class(type(module))
        module._init_lora()
    ref = module.weight
    cast = (lambda t: None if t is None else t.to(device=ref.device, dtype=ref.dtype))
    module.lora_adapters[name] = Adapter(cast(adapter.down), cast(adapter.up), adapter.scale, cast(adapter.up_bias))


def remove_adapter(module: LoraLayer, name: str) -> None:
    """Drop adapter ``name`` (a fused layer keeps its fused weight, as the reference does)."""
    module.lora_adapters.pop(name, None)
    module.lora_weights.pop(name, None)
    module.lora_active = tuple(n for n in module.lora_active if n != name)
    if not module.lora_adapters:
        remove_lora(module)


def remove_lora(module: nn.Module) -> None:
    """Switch a LoRA layer back to its original class; its current weights stay. A hotswap layer keeps
    its class and buffers, zeroed (the base layer's output exactly)."""
    if isinstance(module, HotswapLoraLayer):
        module._init_lora()
        sync_slot(module, type(module).__name__)
        return
    if not isinstance(module, LoraLayer):
        return
    for attr in _LORA_ATTRIBUTES:
        module.__dict__.pop(attr, None)
    module.__class__ = module._lora_base_class


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _set_call_scale(model: nn.Module, scale: float) -> Token:
    """Scale every LoRA layer of ``model`` by ``scale`` in this context; returns the token to undo it."""
    scales = {id(layer): float(scale) for layer in lora_layers(model)}
    return _CALL_SCALES.set({**_CALL_SCALES.get(), **scales})


@contextlib.contextmanager
def lora_call_scale(model: nn.Module | None, scale: float | None):
    """Within the block (in this thread only), every LoRA layer of ``model`` applies its adapters times ``scale``."""
    token = _set_call_scale(model, scale) if model is not None and scale is not None else None
    try:
        yield
    finally:
        if token is not None:
            _CALL_SCALES.reset(token)


def _scale_from_call(model: nn.Module, args: tuple, kwargs: dict) -> float | None:
    found = {k: kwargs[k] for k in SCALE_KWARGS if k in kwargs}
    if not found and args:
        try:
            bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        found = {k: bound[k] for k in SCALE_KWARGS if k in bound}
    for options in found.values():
        if isinstance(options, dict) and "scale" in options:
            return float(options["scale"])
    return None


def peft_layers(model: nn.Module) -> list[nn.Module]:
    """peft's tuner layers in ``model`` (none unless peft is imported); never diffusekit's own, even where
    ``BaseTunerLayer`` counts them as its (a virtual subclass registered by code written for peft)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return []
    return [m for m in model.modules() if isinstance(m, tuners.BaseTunerLayer) and not isinstance(m, LoraLayer)]


@contextlib.contextmanager
def scaled_peft_layers(model: nn.Module | None, scale: float | None) -> Iterator[None]:
    """Within the block, the active adapters of ``model``'s peft layers act times ``scale``."""
    found = [] if model is None or scale is None or scale == 1.0 else peft_layers(model)
    for layer in found:
        layer.scale_layer(scale)
    try:
        yield
    finally:
        for layer in found:
            if scale != 0:
                layer.unscale_layer(scale)
            else:
                for name in layer.active_adapters:
                    layer.set_scale(name, 1.0)


@contextlib.contextmanager
def compiled_call_scale(model: nn.Module, scale: float | None) -> Iterator[None]:
    """For a compiled forward of a prepared ``model``: its call-scale buffers hold ``scale`` (1.0 for
    None) and its lock is held within the block (see :mod:`~diffusekit.loaders.lora_hotswap`).
    Nothing for a model not prepared."""
    prepared = getattr(model, HOTSWAP_ATTRIBUTE, None)
    if prepared is None:
        yield
        return
    value = 1.0 if scale is None else float(scale)
    with model._lora_scale_lock:
        if model._lora_call_scale != value:
            for layer in prepared[1].values():
                layer.lora_hotswap_call_scale.fill_(value)
            model._lora_call_scale = value
        yield


def _without_scale(kwargs: dict) -> dict:
    """``kwargs`` with ``scale`` left out of the attention kwargs (a new dict; the caller's is unchanged)."""
    kept = dict(kwargs)
    for name in SCALE_KWARGS:
        options = kwargs.get(name)
        if isinstance(options, dict) and "scale" in options:
            kept[name] = {k: v for k, v in options.items() if k != "scale"} or None
    return kept


def install_scale_hook(model: nn.Module) -> None:
    """Make ``model(..., cross_attention_kwargs={"scale": s})`` scale its LoRA layers (and peft's) for that call."""
    if getattr(model, "_lora_scale_hooks", None):
        return

    def before(module, args, kwargs):
        scale = _scale_from_call(module, args, kwargs)
        compiled = getattr(module, "_diffusekit_compile", None) is not None
        prepared = getattr(module, HOTSWAP_ATTRIBUTE, None) is not None
        if scale not in (None, 1.0) and compiled and not prepared:
            raise ValueError(f"a LoRA call scale ({scale}) needs an eager {type(module).__name__} or one prepared "
                             "with enable_lora_hotswap() before compile(): a compiled graph cannot read it; "
                             "set adapter weights with set_adapters() instead")
        # most calls give no scale: nothing to undo; a compiled prepared model always sets its scale buffers
        undo = None if scale is None and not (compiled and prepared) else contextlib.ExitStack()
        if undo is not None:
            if compiled and prepared:
                undo.enter_context(compiled_call_scale(module, scale))
            if scale is not None:
                undo.callback(_CALL_SCALES.reset, _set_call_scale(module, scale))
                undo.enter_context(scaled_peft_layers(module, scale))
        _HOOK_TOKENS.set((*_HOOK_TOKENS.get(), undo))
        if compiled and prepared and scale is not None:  # a float the graph would guard on: it is in the buffers
            return args, _without_scale(kwargs)

    def after(module, args, kwargs, output):
        *outer, undo = _HOOK_TOKENS.get() or (None,)
        _HOOK_TOKENS.set(tuple(outer))
        if undo is not None:
            undo.close()

    model._lora_scale_hooks = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    )


def remove_scale_hook(model: nn.Module) -> None:
    for handle in getattr(model, "_lora_scale_hooks", None) or ():
        handle.remove()
    model.__dict__.pop("_lora_scale_hooks", None)
