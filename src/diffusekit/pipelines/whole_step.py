"""Compiled whole denoising steps: ``pipe.compile(whole_step=True)``.

One ``torch.compile(fullgraph=True)`` graph per step holds the scheduler's input scaling, the
denoiser's forward, classifier-free guidance and the scheduler's update, so on a GPU the whole
step can be one CUDA graph (``mode="reduce-overhead"``). Nothing in it reads a value back to the
host: the scheduler gives its step as a :class:`~diffusekit.schedulers.stepping.StepPlan` (pure
functions, the same ones its eager ``step`` calls, and a table of per-position coefficients that
a call moves to the latents' device once); the loop hands the graph the latents, the timestep,
that table's row for the step (a device tensor) and the guidance scale as a device tensor, so
neither the step index nor a new guidance scale recompiles. The position is kept on the host by
the call's own scheduler copy (``plan_position`` / ``plan_advance``), as its eager ``step`` does.

What recompiles: a new shape or dtype, the first call with another scheduler class (each
``StepPlan`` has its own update function; the graphs stay cached, so swapping back and forth or a
new scheduler of a known class compiles nothing), a new ``guidance_rescale`` value, toggling
guidance, and LoRA changes as for a compiled denoiser (none after ``enable_lora_hotswap``).

A call runs its steps eagerly instead (one warning per call, naming why) when its scheduler has no
plan (DPM-Solver and other multistep or stochastic schedulers, DDIM with ``eta`` > 0, Euler
subclasses), the denoiser has forward hooks other than diffusekit's LoRA ones (CPU offload), a
cache is enabled, or a LoRA call scale is given to a model not prepared with ``enable_lora_hotswap``.
LoRA call scales of a prepared model go into its scale buffers (``lora_layers.compiled_call_scale``).

With CUDA graphs the compiled step's output is copied out of the graph's static buffer each step
(``cudagraph_mark_step_begin`` before each replay), so latents kept by callbacks stay valid.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from ..loaders import lora_hotswap, lora_layers
from .guidance import guided_noise

logger = logging.getLogger(__name__)

#: Pipeline attribute holding its :class:`WholeStep` after ``pipe.compile(whole_step=True)``.
WHOLE_STEP_ATTRIBUTE = "_diffusekit_whole_step"


def step_frame(predict: Callable, denoiser: nn.Module, scale_input: Callable, update: Callable, constants: tuple,
               latents: torch.Tensor, t: torch.Tensor, row: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """One denoising step, the function that is compiled: ``predict(denoiser, scale, latents, t, inputs)``
    (a pipeline family's guided prediction, calling the denoiser's ``forward``: its hooks run outside)
    between the plan's input scaling and its update."""
    model_output = predict(denoiser, lambda sample: scale_input(sample, row), latents, t, inputs)
    return update(model_output, latents, row, constants)


def sd_prediction(denoiser: nn.Module, scale_input: Callable, latents: torch.Tensor, t, inputs: dict) -> torch.Tensor:
    """The Stable Diffusion family's ``predict`` for :func:`step_frame` (:func:`guided_noise`)."""
    return guided_noise(denoiser.forward, scale_input, latents, t, **inputs)


def without_scale(name: str, options: dict | None) -> dict[str, Any]:
    """``{name: options}`` without the LoRA ``scale`` (compiled calls take it from the scale buffers),
    or nothing when that leaves it empty."""
    rest = {k: v for k, v in (options or {}).items() if k != "scale"}
    return {name: rest} if rest else {}


class CallPlan:
    """What one call's compiled steps share: the pipeline's :class:`WholeStep`, the scheduler's plan,
    and the call's scalars (guidance scales) as device tensors, made again when a callback changes one."""

    def __init__(self, compiled: "WholeStep", plan, device: torch.device) -> None:
        self.compiled, self.plan, self.device = compiled, plan, device
        self.scalars: dict[str, tuple[float, torch.Tensor]] = {}

    def scalar(self, name: str, value: float) -> torch.Tensor:
        value = float(value)
        if name not in self.scalars or self.scalars[name][0] != value:
            self.scalars[name] = (value, torch.tensor(value, device=self.device))
        return self.scalars[name][1]

    def step(self, state, denoiser: nn.Module, predict: Callable, latents: torch.Tensor, t, inputs: dict[str, Any],
             scalars: dict[str, float]) -> torch.Tensor | None:
        """The next latents through the compiled step; None for a timestep not in the schedule.
        ``scalars`` join ``inputs`` as device tensors (a new value does not recompile)."""
        scheduler, plan, compiled = state.scheduler, self.plan, self.compiled
        position = scheduler.plan_position(t)
        if position is None:
            return None
        inputs = {**inputs, **{name: self.scalar(name, value) for name, value in scalars.items()}}
        with lora_layers.compiled_call_scale(denoiser, state.lora_scale):
            lora_hotswap.sync_hotswap(denoiser)
            if compiled.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            latents = compiled.frame(predict, denoiser, plan.scale_input, plan.update, plan.constants, latents, t,
                                     plan.coefficients[position], inputs)
        scheduler.plan_advance()
        return latents.clone() if compiled.cudagraphs else latents


class WholeStep:
    """A pipeline's compiled step function and the settings it was compiled with (no call state)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.frame = torch.compile(step_frame, **settings)
        options = settings.get("options") or {}
        self.cudagraphs = settings.get("mode") == "reduce-overhead" or bool(options.get("triton.cudagraphs"))

    def plan_call(self, state, denoiser: nn.Module, latents: torch.Tensor, extra_step: dict) -> CallPlan | None:
        """The call's :class:`CallPlan`, or None (with a warning saying why) when its steps run eagerly."""
        reason = eager_reason(state, denoiser)
        plan = None
        if reason is None:
            make_plan = getattr(state.scheduler, "step_plan", None)
            plan = make_plan(latents.device, **extra_step) if make_plan is not None else None
            if plan is None:
                reason = f"{type(state.scheduler).__name__} (with these step options) has no step plan"
        if reason is not None:
            logger.warning("pipe.compile(whole_step=True): this call runs its steps eagerly: %s", reason)
            return None
        return CallPlan(self, plan, latents.device)


def eager_reason(state, denoiser: nn.Module) -> str | None:
    """Why the call cannot use the compiled step (None when it can), the scheduler aside."""
    known = {handle.id for handle in (*(getattr(denoiser, "_lora_scale_hooks", None) or ()),
                                      getattr(denoiser, "_lora_hotswap_hook", None)) if handle is not None}
    hooks = set(denoiser._forward_pre_hooks) | set(denoiser._forward_hooks)
    if hooks - known:
        return f"{type(denoiser).__name__} has forward hooks (CPU offload?) that must run at every call"
    if getattr(denoiser, "is_cache_enabled", False):
        return f"{type(denoiser).__name__} has a cache enabled"
    scale = state.lora_scale
    if scale not in (None, 1.0) and lora_hotswap.hotswap_layers(denoiser) is None:
        return f"a LoRA call scale ({scale}) needs enable_lora_hotswap before compile() to run compiled"
    return None


def call_plan(pipe, state, denoiser: nn.Module, latents: torch.Tensor, extra_step: dict) -> CallPlan | None:
    """The call's :class:`CallPlan` (made at its first step), or None when its steps run eagerly:
    ``pipe`` not compiled with ``whole_step=True``, or see :func:`eager_reason` and the scheduler's plan."""
    compiled: WholeStep | None = getattr(pipe, WHOLE_STEP_ATTRIBUTE, None)
    if compiled is None:
        return None
    if state.whole_step is None:
        state.whole_step = compiled.plan_call(state, denoiser, latents, extra_step) or False
    return state.whole_step or None


def check_whole_step(pipe, settings: dict[str, Any]) -> None:
    """ValueError unless ``pipe``'s loop can run a compiled whole step with these settings."""
    from .compile import check_settings

    check_settings(settings.get("mode"), settings.get("options"))
    if not getattr(type(pipe), "_whole_step_loop", False):
        raise ValueError(f"{type(pipe).__name__} has no whole-step loop; use pipe.compile(whole_step=False)")


def compile_whole_step(pipe, settings: dict[str, Any]) -> None:
    """Make ``pipe``'s denoising loop run through a compiled whole step (module docstring)."""
    setattr(pipe, WHOLE_STEP_ATTRIBUTE, WholeStep(settings))


def drop_whole_step(pipe) -> None:
    """Back to per-step eager loops (what ``pipe.compile(whole_step=False)`` does first)."""
    pipe.__dict__.pop(WHOLE_STEP_ATTRIBUTE, None)
