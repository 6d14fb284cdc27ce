"""Caching accelerators for denoisers: skip work that changes little from one step to the next.

The reference's API (``model.enable_cache(config)``, ``disable_cache()``, ``is_cache_enabled``,
``cache_context(name)``) with six configs, all off unless enabled:

- :class:`FirstBlockCacheConfig` (transformers with ``transformer_blocks`` /
  ``single_transformer_blocks``, i.e. FLUX): run the first block; when its residual moved less than
  ``threshold`` (relative mean absolute change) since the last full step, reuse the last full step's
  residual of the other blocks instead of running them.
- :class:`FasterCacheConfig` (FLUX): every ``spatial_attention_block_skip_range``-th step inside
  ``spatial_attention_timestep_skip_range`` the attention layers run; on the others they return
  ``last + (last - previous) * attention_weight_callback(attn)`` from their last two outputs.
- :class:`PyramidAttentionBroadcastConfig` (FLUX): the same attention layers, inside their timestep
  range, run every ``*_block_skip_range``-th step and return their last output on the others.
- :class:`MagCacheConfig` (FLUX): from the step ``retention_ratio * num_inference_steps`` on, the
  blocks are skipped (the last full step's residual added to the first block's input) while the
  error accumulated from the calibrated ``mag_ratios`` stays under ``threshold``, at most
  ``max_skip_steps`` steps in a row.
- :class:`TaylorSeerCacheConfig` (FLUX): chosen modules (the attention layers, or in lite mode
  ``proj_out``) run fully on some steps and on the others return a Taylor expansion of their
  recent outputs (modules in ``skip_predict_identifiers`` return zeros instead).
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
import math
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
_PAB_SPATIAL_NAMES = ("blocks", "transformer_blocks", "single_transformer_blocks")  # re.search on layer names
_PAB_TEMPORAL_NAMES = ("temporal_transformer_blocks",)
_PAB_CROSS_NAMES = ("blocks", "transformer_blocks")
_UNCOND_COND_INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                            "encoder_attention_mask")
_TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW")
_CONTEXT_FIELDS = ("step_index", "num_inference_steps", "timestep", "sigma")
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
_TAYLOR_LITE_PREDICTED = (r"proj_out",)  # full-match patterns of TaylorSeer's lite mode
_TAYLOR_LITE_ZEROED = (r"[^.]*block[^.]*\.[^.]+",)  # the blocks of each top-level block list


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
class PyramidAttentionBroadcastConfig:
    """Pyramid Attention Broadcast: inside its timestep range, an attention layer runs every
    ``*_block_skip_range``-th step and otherwise returns its last output. Layers are matched by name
    (``re.search`` of the identifiers; cross-attention layers only by the cross plan). The current
    timestep (0-1000) is ``current_timestep_callback()``, or, when that is None, the timestep the
    model was called with."""

    spatial_attention_block_skip_range: int | None = None
    temporal_attention_block_skip_range: int | None = None
    cross_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[int, int] = (100, 800)
    temporal_attention_timestep_skip_range: tuple[int, int] = (100, 800)
    cross_attention_timestep_skip_range: tuple[int, int] = (100, 800)
    spatial_attention_block_identifiers: tuple[str, ...] = _PAB_SPATIAL_NAMES
    temporal_attention_block_identifiers: tuple[str, ...] = _PAB_TEMPORAL_NAMES
    cross_attention_block_identifiers: tuple[str, ...] = _PAB_CROSS_NAMES
    current_timestep_callback: Callable[[], float] | None = None


@dataclass
class MagCacheConfig:
    """MagCache: skip whole steps while the accumulated magnitude-ratio error stays small.

    ``mag_ratios`` (one per step, model-dependent; resampled to ``num_inference_steps`` by nearest
    neighbour) are required unless ``calibrate=True``, which skips nothing and logs the ratios it
    measured when the last step ends."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: torch.Tensor | list[float] | None = None
    calibrate: bool = False

    def __post_init__(self) -> None:
        if self.calibrate or self.mag_ratios is None:
            if self.mag_ratios is None and not self.calibrate:
                raise ValueError("MagCacheConfig: `mag_ratios` must be given (they are model-dependent): run once "
                                 "with `MagCacheConfig(calibrate=True, ...)` and pass the logged ratios.")
            return
        ratios = self.mag_ratios if torch.is_tensor(self.mag_ratios) else torch.tensor(self.mag_ratios)
        self.mag_ratios = _nearest_resample(ratios, self.num_inference_steps)


def _nearest_resample(values: torch.Tensor, length: int) -> torch.Tensor:
    """``values`` stretched or shrunk to ``length`` entries by nearest neighbour (ends kept)."""
    if len(values) == length:
        return values
    if length == 1:
        return values[-1:]
    positions = torch.arange(length, dtype=torch.float32) * ((len(values) - 1) / (length - 1))
    return values[torch.round(positions).long()]


@dataclass
class TaylorSeerCacheConfig:
    """TaylorSeer: modules run fully for the first ``disable_cache_before_step`` steps, then every
    ``cache_interval``-th step (and from ``disable_cache_after_step`` on); on the other steps they
    return the Taylor expansion (up to ``max_order``) of their last full outputs, kept in
    ``taylor_factors_dtype``. ``cache_identifiers`` / ``skip_predict_identifiers`` are regexes
    (full match on module names) of modules to predict / to return zeros on predicted steps;
    by default the attention layers are predicted. ``use_lite_mode`` predicts only ``proj_out``
    and zeroes the blocks (overriding the identifiers)."""

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: torch.dtype | None = torch.bfloat16
    skip_predict_identifiers: list[str] | None = None
    cache_identifiers: list[str] | None = None
    use_lite_mode: bool = False


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

    def enable_cache(self, config: Any) -> None:
        """Turn on the caching technique ``config`` describes (one at a time): a
        FirstBlockCacheConfig, FasterCacheConfig, PyramidAttentionBroadcastConfig, MagCacheConfig,
        TaylorSeerCacheConfig or DeepCacheConfig."""
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


def _encoder_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]


def _transformer_blocks(model: nn.Module, technique: str) -> list[nn.Module]:
    """The blocks of ``_BLOCK_LISTS`` in order; blocks are called ``block(hidden_states,
    encoder_hidden_states, ...)`` and return ``(encoder_hidden_states, hidden_states)`` (FLUX)."""
    blocks = [block for name in _BLOCK_LISTS for block in getattr(model, name, ())]
    if len(blocks) < 2:
        raise ValueError(f"{technique} needs a transformer with at least 2 blocks in {_BLOCK_LISTS}; "
                         f"{type(model).__name__} has {len(blocks)}")
    return blocks


# -- First Block Cache --------------------------------------------------------------------------------

@dataclass
class _FirstBlockState:
    head_output: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, encoder) after the first block
    head_residual: torch.Tensor | None = None
    tail_residuals: tuple[torch.Tensor, torch.Tensor] | None = None
    compute: bool = True


def _apply_first_block_cache(model: nn.Module, config: FirstBlockCacheConfig, undo: list) -> None:
    blocks = _transformer_blocks(model, "FirstBlockCacheConfig")
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
        return _encoder_input(args, kwargs), _hidden_input(args, kwargs)
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
    weight = config.attention_weight_callback
    if weight is None:
        logger.warning("No `attention_weight_callback` provided when enabling FasterCache. Defaulting to using a "
                       "weight of 0.5 for all timesteps.")
        weight = lambda _: 0.5  # noqa: E731
    plans = ((config.spatial_attention_block_identifiers, config.spatial_attention_block_skip_range,
              config.spatial_attention_timestep_skip_range, False),
             (config.temporal_attention_block_identifiers, config.temporal_attention_block_skip_range,
              config.temporal_attention_timestep_skip_range, False))
    _reuse_attention(model, config, plans, weight, undo)


def _apply_pyramid_attention_broadcast(model: nn.Module, config: PyramidAttentionBroadcastConfig,
                                       undo: list) -> None:
    plans = ((config.spatial_attention_block_identifiers, config.spatial_attention_block_skip_range,
              config.spatial_attention_timestep_skip_range, False),
             (config.temporal_attention_block_identifiers, config.temporal_attention_block_skip_range,
              config.temporal_attention_timestep_skip_range, False),
             (config.cross_attention_block_identifiers, config.cross_attention_block_skip_range,
              config.cross_attention_timestep_skip_range, True))
    _reuse_attention(model, config, plans, None, undo)


def _reuse_attention(model: nn.Module, config: Any, plans: tuple, weight: Callable[[nn.Module], float] | None,
                     undo: list) -> None:
    """Wrap the attention layers of the first plan ``(identifiers, skip range, timestep range, cross)``
    each matches; reused outputs are extrapolated with ``weight`` (None: the last output as it is)."""
    timestep_scale = getattr(model, "_cache_timestep_scale", None)
    if timestep_scale is None:
        raise ValueError(f"{type(config).__name__} is not supported by {type(model).__name__}")
    state = functools.partial(_state, model, _FasterState)
    now = config.current_timestep_callback or (lambda: state().timestep)
    for name, module in model.named_modules():
        plan = next((p for p in plans if p[1] is not None and _matches(name, p[0]) and _is_attention(module, p[3])),
                    None)
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


def _is_attention(module: nn.Module, cross: bool = False) -> bool:
    return hasattr(module, "processor") and bool(getattr(module, "is_cross_attention", False)) == cross


@dataclass(frozen=True)
class _AttentionRule:
    skip_range: int
    timestep_range: tuple[float, float]
    weight: Callable[[nn.Module], float] | None  # None: reuse the last output as it is
    now: Callable[[], float]

    def reuse(self, layer: _AttentionState) -> bool:
        low, high = self.timestep_range
        due = layer.iteration > 0 and layer.iteration % self.skip_range == 0
        return bool(layer.outputs) and not due and low < self.now() < high


def _attention_forward(inner: Callable, module: nn.Module, state_of: Callable, rule: _AttentionRule,
                       *args: Any, **kwargs: Any):
    layer = state_of().layers.setdefault(id(module), _AttentionState())
    reuse = rule.reuse(layer)
    if reuse and rule.weight is None:
        output = layer.outputs[-1]
    elif reuse:
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


# -- MagCache -------------------------------------------------------------------------------------


@dataclass
class _MagState:
    step: int = 0
    compute: bool = True
    head_input: torch.Tensor | None = None
    residual: torch.Tensor | None = None  # tail output - head input at the last full step
    ratio: Any = 1.0  # accumulated magnitude ratio since the last full step
    error: Any = 0.0
    skipped: int = 0
    measured: list = field(default_factory=list)  # calibration ratios


def _apply_mag_cache(model: nn.Module, config: MagCacheConfig, undo: list) -> None:
    blocks = _transformer_blocks(model, "MagCacheConfig")
    state = functools.partial(_state, model, _MagState)
    for block in blocks[1:-1]:
        _wrap(block, lambda inner: functools.partial(_mag_later_block, inner, state, config, False), undo)
    _wrap(blocks[-1], lambda inner: functools.partial(_mag_later_block, inner, state, config, True), undo)
    _wrap(blocks[0], lambda inner: functools.partial(_mag_head_block, inner, state, config), undo)


def _mag_head_block(inner: Callable, state_of: Callable, config: MagCacheConfig, *args: Any, **kwargs: Any):
    state = state_of()
    hidden = state.head_input = _hidden_input(args, kwargs)
    state.compute = config.calibrate or not _mag_may_skip(state, config)
    if state.compute:
        return inner(*args, **kwargs)
    return _encoder_input(args, kwargs), _add_residual(hidden, state.residual.to(hidden.device))


def _mag_may_skip(state: _MagState, config: MagCacheConfig) -> bool:
    """Accumulate this step's ratio; True when the step may reuse the last residual (else the
    accumulators restart)."""
    if state.step < int(config.retention_ratio * config.num_inference_steps + 0.5):
        return False
    state.ratio = state.ratio * (config.mag_ratios[state.step] if state.step < len(config.mag_ratios) else 1.0)
    state.skipped += 1
    state.error = state.error + abs(1.0 - state.ratio)
    if state.residual is not None and state.error <= config.threshold and state.skipped <= config.max_skip_steps:
        return True
    state.ratio, state.error, state.skipped = 1.0, 0.0, 0
    return False


def _add_residual(hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``hidden + residual``; a residual over fewer tokens is added to the last tokens."""
    if residual.shape == hidden.shape:
        return hidden + residual
    extra = hidden.shape[1] - residual.shape[1] if hidden.ndim == residual.ndim == 3 else -1
    if extra > 0 and hidden.shape[::2] == residual.shape[::2]:
        return torch.cat([hidden[:, :extra], hidden[:, extra:] + residual], dim=1)
    logger.warning("MagCache: the residual %s does not fit the input %s; the step returns its input.",
                   tuple(residual.shape), tuple(hidden.shape))
    return hidden


def _mag_later_block(inner: Callable, state_of: Callable, config: MagCacheConfig, is_tail: bool,
                     *args: Any, **kwargs: Any):
    state = state_of()
    if not state.compute:
        if is_tail:
            _mag_next_step(state, config)
        return _encoder_input(args, kwargs), _hidden_input(args, kwargs)
    encoder, hidden = inner(*args, **kwargs)
    if is_tail and state.head_input is not None:
        residual = _mag_residual(hidden, state.head_input)
        if config.calibrate:
            state.measured.append(_norm_ratio(residual, state.residual))
        state.residual = residual
        _mag_next_step(state, config)
    return encoder, hidden


def _mag_residual(output: torch.Tensor, head_input: torch.Tensor) -> torch.Tensor:
    if output.shape == head_input.shape:
        return output - head_input
    if output.ndim == head_input.ndim == 3 and output.shape[2] == head_input.shape[2]:
        return output[:, -head_input.shape[1]:] - head_input
    return output


@torch.compiler.disable
def _norm_ratio(residual: torch.Tensor, previous: torch.Tensor | None) -> float:
    if previous is None:
        return 1.0
    norms = torch.linalg.norm(residual.float(), dim=-1), torch.linalg.norm(previous.float(), dim=-1)
    return (norms[0] / (norms[1] + 1e-8)).mean().item()


def _mag_next_step(state: _MagState, config: MagCacheConfig) -> None:
    """Count the step; after the last one, log a calibration's ratios and start over."""
    state.step += 1
    if state.step < config.num_inference_steps:
        return
    if config.calibrate:
        logger.info("MagCache calibration: mag_ratios=%s", state.measured)
    state.step, state.ratio, state.error, state.skipped, state.residual, state.measured = 0, 1.0, 0.0, 0, None, []


# -- TaylorSeer -----------------------------------------------------------------------------------


@dataclass
class _TaylorLayer:
    step: int = -1
    last_update: int | None = None
    factors: list = field(default_factory=list)  # per output: [value, first difference, ...]
    dtypes: tuple = ()
    shapes: tuple = ()
    device: torch.device | None = None


@dataclass
class _TaylorState:
    layers: dict = field(default_factory=dict)  # id(module) -> _TaylorLayer


@dataclass(frozen=True)
class _TaylorRule:
    config: TaylorSeerCacheConfig
    zeroed: bool  # a skip_predict module: zeros on predicted steps

    def computes(self, step: int) -> bool:
        c = self.config
        return (step < c.disable_cache_before_step or (step - c.disable_cache_before_step - 1) % c.cache_interval == 0
                or (c.disable_cache_after_step is not None and step >= c.disable_cache_after_step))


def _apply_taylorseer_cache(model: nn.Module, config: TaylorSeerCacheConfig, undo: list) -> None:
    zeroed, predicted = tuple(config.skip_predict_identifiers or ()), tuple(config.cache_identifiers or ())
    predicted = predicted or _FLUX_ATTENTION_NAMES + _TEMPORAL_ATTENTION_NAMES
    if config.use_lite_mode:
        if config.skip_predict_identifiers or config.cache_identifiers:
            logger.warning("TaylorSeer lite mode overrides skip_predict_identifiers and cache_identifiers.")
        zeroed, predicted = _TAYLOR_LITE_ZEROED, _TAYLOR_LITE_PREDICTED
    state = functools.partial(_state, model, _TaylorState, need_context=True)
    for name, module in model.named_modules():
        is_zeroed = any(re.fullmatch(p, name) for p in zeroed)
        if is_zeroed or any(re.fullmatch(p, name) for p in predicted):
            rule = _TaylorRule(config, is_zeroed)
            _wrap(module, lambda inner, rule=rule, module=module: functools.partial(
                _taylor_forward, inner, module, state, rule), undo)


def _taylor_forward(inner: Callable, module: nn.Module, state_of: Callable, rule: _TaylorRule,
                    *args: Any, **kwargs: Any):
    layer = state_of().layers.setdefault(id(module), _TaylorLayer())
    layer.step += 1
    if rule.computes(layer.step):
        output = inner(*args, **kwargs)
        _taylor_update(layer, rule, (output,) if isinstance(output, torch.Tensor) else tuple(output))
        return output
    outputs = _taylor_predict(layer, rule.zeroed)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _taylor_update(layer: _TaylorLayer, rule: _TaylorRule, outputs: tuple[torch.Tensor, ...]) -> None:
    layer.dtypes, layer.device = tuple(o.dtype for o in outputs), outputs[0].device
    if rule.zeroed:
        layer.shapes = tuple(o.shape for o in outputs)
    else:
        layer.factors = [_taylor_factors(layer, rule.config, i, o) for i, o in enumerate(outputs)]
    layer.last_update = layer.step


def _taylor_factors(layer: _TaylorLayer, config: TaylorSeerCacheConfig, index: int,
                    output: torch.Tensor) -> list[torch.Tensor]:
    """[output, its finite differences up to max_order] against the last full step's factors."""
    factors = [output]
    previous = layer.factors[index] if layer.last_update is not None and index < len(layer.factors) else []
    for order in range(min(config.max_order, len(previous))):
        if previous[order].shape != factors[order].shape:
            break
        delta = (factors[order] - previous[order].to(output.dtype)) / (layer.step - layer.last_update)
        factors.append(delta)
    dtype = config.taylor_factors_dtype
    return [f.to(dtype) for f in factors] if dtype is not None else factors


@torch.compiler.disable
def _taylor_predict(layer: _TaylorLayer, zeroed: bool) -> list[torch.Tensor]:
    if layer.last_update is None:
        raise ValueError("TaylorSeer: a module was asked to predict before any full step ran")
    if zeroed:
        return [torch.zeros(s, dtype=d, device=layer.device) for s, d in zip(layer.shapes, layer.dtypes)]
    offset = layer.step - layer.last_update
    outputs = []
    for factors, dtype in zip(layer.factors, layer.dtypes):
        output = torch.zeros_like(factors[0], dtype=dtype)
        for order, factor in enumerate(factors):
            output = output + factor.to(dtype) * (offset**order / math.factorial(order))
        outputs.append(output)
    return outputs


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
    PyramidAttentionBroadcastConfig: _apply_pyramid_attention_broadcast,
    MagCacheConfig: _apply_mag_cache,
    TaylorSeerCacheConfig: _apply_taylorseer_cache,
}
