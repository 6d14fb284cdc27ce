"""Caching accelerators for denoisers: skip work that changes little from one step to the next.

The reference's API (``model.enable_cache(config)``, ``disable_cache()``, ``is_cache_enabled``,
``cache_context(name)``) with three configs, all off unless enabled:

- :class:`FirstBlockCacheConfig` (transformers with ``transformer_blocks`` /
  ``single_transformer_blocks``, i.e. FLUX): run the first block; when its residual moved less than
  ``threshold`` (relative mean absolute change) since the last full step, reuse the last full step's
  residual of the other blocks instead of running them.
- :class:`FasterCacheConfig` (FLUX): every ``spatial_attention_block_skip_range``-th step inside
  ``spatial_attention_timestep_skip_range`` the attention layers run; on the others they return
  ``last + (last - previous) * attention_weight_callback(attn)`` from their last two outputs.
- :class:`DeepCacheConfig` (diffusekit's own, UNet2DConditionModel): every ``cache_interval``-th
  step runs the whole UNet; the others run only the outer ``cache_branch_id + 1`` down and up
  levels and reuse the deeper levels' last output (DeepCache, Ma et al. 2023).

Enabling wraps the blocks' ``forward`` (instance attributes; ``disable_cache`` restores what was
there). The running state (last residuals, step counters) is never kept on the model: it lives in a
store held by a context variable. A pipeline call opens a fresh store (:func:`cache_call_scope`,
entered by ``pipeline_call``), so calls running in several threads never mix their caches and each
call starts clean, as the reference's reset at the end of a call does. Outside a pipeline call the
store belongs to the calling thread and lasts until ``model._reset_stateful_cache()``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

_FLUX_ATTENTION_NAMES = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")
_TEMPORAL_ATTENTION_NAMES = ("^temporal_transformer_blocks.*attn",)
_UNCOND_COND_INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                            "encoder_attention_mask")
_TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW")
_CONTEXT_FIELDS = ("step_index", "num_inference_steps", "timestep", "sigma")


@dataclass
class FirstBlockCacheConfig:
    """First Block Cache: skip the remaining blocks while the first block's residual changes by at
    most ``threshold`` (mean absolute change relative to the last full step's residual)."""

    threshold: float = 0.05


@dataclass
class FasterCacheConfig:
    """FasterCache's attention reuse (the reference's fields and defaults).

    diffusekit implements the attention part: attention layers whose name matches
    ``spatial_attention_block_identifiers`` (or the temporal ones) run on the first step, outside
    their timestep range and every ``*_block_skip_range``-th step; on the other steps they return
    ``t + (t - t_prev) * attention_weight_callback(attn)`` (0.5 when None) from their last two
    outputs. The current timestep (0-1000) is ``current_timestep_callback()``, or, when that is None,
    the timestep the model was called with. The unconditional-branch skip (the frequency fields,
    ``unconditional_batch_*``) needs a batched guidance pass, which FLUX does not make, so
    ``is_guidance_distilled`` must be True; those fields are accepted for the reference's API.
    """

    spatial_attention_block_skip_range: int | None = 2
    temporal_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[int, int] = (-1, 681)
    temporal_attention_timestep_skip_range: tuple[int, int] = (-1, 681)
    low_frequency_weight_update_timestep_range: tuple[int, int] = (99, 901)
    high_frequency_weight_update_timestep_range: tuple[int, int] = (-1, 301)
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    unconditional_batch_skip_range: int = 5
    unconditional_batch_timestep_skip_range: tuple[int, int] = (-1, 641)
    spatial_attention_block_identifiers: tuple[str, ...] = _FLUX_ATTENTION_NAMES
    temporal_attention_block_identifiers: tuple[str, ...] = _TEMPORAL_ATTENTION_NAMES
    attention_weight_callback: Callable[[nn.Module], float] | None = None
    low_frequency_weight_callback: Callable[[nn.Module], float] | None = None
    high_frequency_weight_callback: Callable[[nn.Module], float] | None = None
    tensor_format: str = "BCFHW"
    is_guidance_distilled: bool = False
    current_timestep_callback: Callable[[], float] | None = None
    _unconditional_conditional_input_kwargs_identifiers: tuple[str, ...] = _UNCOND_COND_INPUT_NAMES


@dataclass
class DeepCacheConfig:
    """DeepCache for UNets: a full pass every ``cache_interval`` steps; in between only the down and
    up blocks ``0..cache_branch_id`` run, the deeper levels' last output is reused."""

    cache_interval: int = 3
    cache_branch_id: int = 0


# -- per-call state ---------------------------------------------------------------------------------

#: model -> {context name -> state} for the running call (or this thread, outside a call)
_STORE: ContextVar["weakref.WeakKeyDictionary | None"] = ContextVar("diffusekit_cache_store", default=None)
#: id(model) -> name of the open cache_context
_CONTEXT: ContextVar[Mapping[int, str]] = ContextVar("diffusekit_cache_context", default=MappingProxyType({}))


@contextlib.contextmanager
def cache_call_scope() -> Iterator[None]:
    """A fresh cache store for the enclosed code (one pipeline call): caches start empty and what
    they keep is dropped on exit."""
    token = _STORE.set(weakref.WeakKeyDictionary())
    try:
        yield
    finally:
        _STORE.reset(token)


def denoiser_cache_context(model: nn.Module, name: str):
    """``model.cache_context(name)`` for models with caches, else a no-op context."""
    opener = getattr(model, "cache_context", None)
    return opener(name) if opener is not None else contextlib.nullcontext()


def _model_states(model: nn.Module) -> dict:
    store = _STORE.get()
    if store is None:
        store = weakref.WeakKeyDictionary()
        _STORE.set(store)
    return store.setdefault(model, {})


def _state(model: nn.Module, factory: Callable[[], Any], need_context: bool = False):
    """The state of ``model``'s cache for the open cache_context (a new ``factory()`` the first time)."""
    name = _CONTEXT.get().get(id(model))
    if name is None and need_context:
        raise ValueError(f"{type(model).__name__}: no cache context is set. Wrap the denoiser call in "
                         "`model.cache_context(name)` before calling it.")
    states = _model_states(model)
    if name not in states:
        states[name] = factory()
    return states[name]


# -- the mixin ----------------------------------------------------------------------------------------


class CacheMixin:
    """``enable_cache`` / ``disable_cache`` / ``cache_context`` (the reference's CacheMixin API)."""

    _cache_config = None
    _cache_undo: list | None = None

    @property
    def is_cache_enabled(self) -> bool:
        return self._cache_config is not None

    def enable_cache(self, config: FirstBlockCacheConfig | FasterCacheConfig | DeepCacheConfig) -> None:
        """Turn on the caching technique ``config`` describes (one at a time)."""
        if self.is_cache_enabled:
            raise ValueError(f"Caching has already been enabled with {type(self._cache_config)}. To apply a new "
                             "caching technique, please disable the existing one first.")
        apply = _APPLIERS.get(type(config))
        if apply is None:
            raise ValueError(f"Cache config {type(config)} is not supported.")
        undo: list = []
        try:
            apply(self, config, undo)
        except Exception:
            _restore(undo)
            raise
        self._cache_undo, self._cache_config = undo, config

    def disable_cache(self) -> None:
        """Restore the blocks' forwards; outputs are again exactly the uncached ones."""
        if self._cache_config is None:
            logger.warning("Caching techniques have not been enabled, so there's nothing to disable.")
            return
        _restore(self._cache_undo)
        self._cache_undo, self._cache_config = None, None

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Drop what this model's cache keeps in the current call (or thread)."""
        store = _STORE.get()
        if store is not None:
            store.pop(self, None)

    @contextlib.contextmanager
    def cache_context(self, name: str, **fields: Any) -> Iterator[None]:
        """Name the denoiser calls inside (``"cond"``, ``"uncond"``): each name has its own cache
        state. The reference's extra fields (step_index, num_inference_steps, timestep, sigma) are
        accepted; diffusekit's caches key their state on ``name`` only."""
        unknown = sorted(set(fields) - set(_CONTEXT_FIELDS))
        if unknown:
            raise TypeError(f"cache_context() got unexpected keyword arguments {unknown}")
        token = _CONTEXT.set({**_CONTEXT.get(), id(self): name})
        try:
            yield
        finally:
            _CONTEXT.reset(token)


def _wrap(module: nn.Module, make_forward: Callable[[Callable], Callable], undo: list) -> None:
    """Replace ``module.forward`` by ``make_forward(current forward)``, remembering what to restore."""
    undo.append((module, module.__dict__.get("forward")))
    inner = module.forward
    module.forward = functools.wraps(inner)(make_forward(inner))


def _restore(undo: list) -> None:
    for module, previous in reversed(undo):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


# -- First Block Cache --------------------------------------------------------------------------------

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass
class _FirstBlockState:
    head_output: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, encoder) after the first block
    head_residual: torch.Tensor | None = None
    tail_residuals: tuple[torch.Tensor, torch.Tensor] | None = None
    compute: bool = True


def _apply_first_block_cache(model: nn.Module, config: FirstBlockCacheConfig, undo: list) -> None:
    """Blocks are called ``block(hidden_states, encoder_hidden_states, ...)`` and return
    ``(encoder_hidden_states, hidden_states)`` (FLUX's double- and single-stream blocks)."""
    blocks = [block for name in _BLOCK_LISTS for block in getattr(model, name, ())]
    if len(blocks) < 2:
        raise ValueError(f"FirstBlockCacheConfig needs a transformer with at least 2 blocks in {_BLOCK_LISTS}; "
                         f"{type(model).__name__} has {len(blocks)}")
    state = functools.partial(_state, model, _FirstBlockState, need_context=True)
    _wrap(blocks[0], lambda inner: functools.partial(_head_block, inner, state, config.threshold), undo)
    for block in blocks[1:-1]:
        _wrap(block, lambda inner: functools.partial(_later_block, inner, state, False), undo)
    _wrap(blocks[-1], lambda inner: functools.partial(_later_block, inner, state, True), undo)


def _head_block(inner: Callable, state_of: Callable, threshold: float, *args: Any, **kwargs: Any):
    encoder, hidden = inner(*args, **kwargs)
    residual = hidden - _hidden_input(args, kwargs)
    state = state_of()
    state.compute = state.head_residual is None or _relative_change(residual, state.head_residual) > threshold
    if not state.compute:
        return encoder + state.tail_residuals[1], hidden + state.tail_residuals[0]
    state.head_output, state.head_residual = (hidden, encoder), residual
    return encoder, hidden


@torch.compiler.disable
def _relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    return ((residual - previous).abs().mean() / previous.abs().mean()).item()


def _later_block(inner: Callable, state_of: Callable, is_tail: bool, *args: Any, **kwargs: Any):
    state = state_of()
    if not state.compute:
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return encoder, _hidden_input(args, kwargs)
    encoder, hidden = inner(*args, **kwargs)
    if is_tail:
        head_hidden, head_encoder = state.head_output
        state.tail_residuals = (hidden - head_hidden, encoder - head_encoder)
    return encoder, hidden


# -- FasterCache (attention reuse) ----------------------------------------------------------------


@dataclass
class _AttentionState:
    iteration: int = 0
    outputs: list = field(default_factory=list)  # the last two outputs, oldest first


@dataclass
class _FasterState:
    timestep: float | None = None  # of the running model call (0-1000)
    layers: dict = field(default_factory=dict)  # id(attention) -> _AttentionState


def _apply_faster_cache(model: nn.Module, config: FasterCacheConfig, undo: list) -> None:
    if config.tensor_format not in _TENSOR_FORMATS:
        raise ValueError(f"`tensor_format` must be one of {list(_TENSOR_FORMATS)}, but got {config.tensor_format}.")
    if not config.is_guidance_distilled:
        raise ValueError(f"FasterCacheConfig on {type(model).__name__}: only the attention reuse is implemented, "
                         "which needs is_guidance_distilled=True (FLUX runs each guidance branch in its own call)")
    timestep_scale = getattr(model, "_cache_timestep_scale", None)
    if timestep_scale is None:
        raise ValueError(f"FasterCacheConfig is not supported by {type(model).__name__}")
    weight = config.attention_weight_callback
    if weight is None:
        logger.warning("No `attention_weight_callback` provided when enabling FasterCache. Defaulting to using a "
                       "weight of 0.5 for all timesteps.")
        weight = lambda _: 0.5  # noqa: E731
    state = functools.partial(_state, model, _FasterState)
    now = config.current_timestep_callback or (lambda: state().timestep)
    plans = ((config.spatial_attention_block_identifiers, config.spatial_attention_block_skip_range,
              config.spatial_attention_timestep_skip_range),
             (config.temporal_attention_block_identifiers, config.temporal_attention_block_skip_range,
              config.temporal_attention_timestep_skip_range))
    for name, module in model.named_modules():
        plan = next((p for p in plans if p[1] is not None and _matches(name, p[0]) and _is_attention(module)), None)
        if plan is not None:
            rule = _AttentionRule(plan[1], plan[2], weight, now)
            _wrap(module, lambda inner, rule=rule, module=module: functools.partial(
                _attention_forward, inner, module, state, rule), undo)
    if config.current_timestep_callback is None:
        signature = inspect.signature(type(model).forward)
        _wrap(model, lambda inner: functools.partial(_record_timestep, inner, model, signature, state,
                                                     timestep_scale), undo)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "processor") and not getattr(module, "is_cross_attention", False)


@dataclass(frozen=True)
class _AttentionRule:
    skip_range: int
    timestep_range: tuple[float, float]
    weight: Callable[[nn.Module], float]
    now: Callable[[], float]

    def reuse(self, layer: _AttentionState) -> bool:
        low, high = self.timestep_range
        due = layer.iteration > 0 and layer.iteration % self.skip_range == 0
        return bool(layer.outputs) and not due and low < self.now() < high


def _attention_forward(inner: Callable, module: nn.Module, state_of: Callable, rule: _AttentionRule,
                       *args: Any, **kwargs: Any):
    layer = state_of().layers.setdefault(id(module), _AttentionState())
    if rule.reuse(layer):
        weight = rule.weight(module)
        previous, last = layer.outputs
        output = _map_outputs(lambda old, new: new + (new - old) * weight, previous, last)
    else:
        output = inner(*args, **kwargs)
    layer.outputs = [(layer.outputs or [output])[-1], output]
    layer.iteration += 1
    return output


def _map_outputs(fn: Callable, old, new):
    if isinstance(new, torch.Tensor):
        return fn(old, new)
    return tuple(fn(a, b) for a, b in zip(old, new))


def _record_timestep(inner: Callable, model: nn.Module, signature: inspect.Signature, state_of: Callable,
                     scale: float, *args: Any, **kwargs: Any):
    timestep = signature.bind(model, *args, **kwargs).arguments["timestep"]
    state_of().timestep = float(torch.as_tensor(timestep).flatten()[0]) * scale
    return inner(*args, **kwargs)


# -- DeepCache (UNet) ---------------------------------------------------------------------------------


@dataclass
class _DeepState:
    step: int = 0
    reuse: bool = False
    input_shape: tuple | None = None
    deep_feature: torch.Tensor | None = None  # input of up block n-1-branch at the last full step
    down_outputs: dict = field(default_factory=dict)  # skipped down level -> its last full output


def _apply_deep_cache(model: nn.Module, config: DeepCacheConfig, undo: list) -> None:
    down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    if down is None or up is None or len(down) != len(up):
        raise ValueError(f"DeepCacheConfig needs a UNet with as many down_blocks as up_blocks; "
                         f"{type(model).__name__} has none")
    if not 0 <= config.cache_branch_id <= len(down) - 2:
        raise ValueError(f"DeepCacheConfig.cache_branch_id must be in [0, {len(down) - 2}] for "
                         f"{type(model).__name__}, got {config.cache_branch_id}")
    if config.cache_interval < 1:
        raise ValueError(f"DeepCacheConfig.cache_interval must be >= 1, got {config.cache_interval}")
    state = functools.partial(_state, model, _DeepState)
    branch, last_skipped_up = config.cache_branch_id, len(up) - 2 - config.cache_branch_id
    _wrap(down[0], lambda inner: functools.partial(_deep_first, inner, state, config.cache_interval), undo)
    for level in range(branch + 1, len(down)):
        _wrap(down[level], lambda inner, level=level: functools.partial(_deep_down, inner, state, level), undo)
    if getattr(model, "mid_block", None) is not None:
        _wrap(model.mid_block, lambda inner: functools.partial(_deep_skip, inner, state), undo)
    for level in range(last_skipped_up):
        _wrap(up[level], lambda inner: functools.partial(_deep_skip, inner, state), undo)
    _wrap(up[last_skipped_up], lambda inner: functools.partial(_deep_last_up, inner, state), undo)


def _deep_first(inner: Callable, state_of: Callable, interval: int, *args: Any, **kwargs: Any):
    """The first down block always runs; it decides whether this model call reuses the deep levels."""
    state = state_of()
    shape = tuple(_hidden_input(args, kwargs).shape)
    state.reuse = state.step % interval != 0 and state.deep_feature is not None and shape == state.input_shape
    state.input_shape = shape
    state.step += 1
    return inner(*args, **kwargs)


def _deep_down(inner: Callable, state_of: Callable, level: int, *args: Any, **kwargs: Any):
    """Skipped down levels hand back their last full output (only skipped up blocks read it)."""
    state = state_of()
    if state.reuse:
        return state.down_outputs[level]
    state.down_outputs[level] = output = inner(*args, **kwargs)
    return output


def _deep_skip(inner: Callable, state_of: Callable, *args: Any, **kwargs: Any):
    if state_of().reuse:
        return _hidden_input(args, kwargs)
    return inner(*args, **kwargs)


def _deep_last_up(inner: Callable, state_of: Callable, *args: Any, **kwargs: Any):
    state = state_of()
    if state.reuse:
        return state.deep_feature
    state.deep_feature = output = inner(*args, **kwargs)
    return output


_APPLIERS: dict[type, Callable[[nn.Module, Any, list], None]] = {
    FirstBlockCacheConfig: _apply_first_block_cache,
    FasterCacheConfig: _apply_faster_cache,
    DeepCacheConfig: _apply_deep_cache,
}
