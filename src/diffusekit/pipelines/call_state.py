"""What one pipeline call decides, kept apart from the pipeline so that calls can run side by side.

A pipeline's ``__call__`` (decorated with :func:`pipeline_call`) builds a :class:`CallState` and
registers it with :func:`begin_call`; its helpers get the state as an argument. The state is also
visible, for the call's duration and in the calling thread only (a :class:`contextvars.ContextVar`),
through the reference's read-only pipeline properties that step callbacks use
(``pipe.guidance_scale``, ``pipe.num_timesteps``, ``pipe.interrupt``, ...; see :class:`CallField`).
A callback that sets ``pipe._interrupt = True`` (or ``pipe._guidance_scale``) changes only its own call.
After a call returns, the properties read what that call ended with, in the thread that made it
(the last call of the pipeline there; its scheduler copy and tensors are not kept).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from ..models.cache import cache_call_scope

#: The state of the calls running in this context, by ``id(pipeline)``.
_CALLS: ContextVar[Mapping[int, "CallState | None"]] = ContextVar("diffusekit_calls", default=MappingProxyType({}))
#: The last finished call of each pipeline in this context: ``id(pipeline) -> (weak ref, slim state)``.
_FINISHED: ContextVar[Mapping[int, tuple]] = ContextVar("diffusekit_finished_calls", default=MappingProxyType({}))

#: The UNet keyword argument holding added conditioning (SDXL's text_time, the IP image embeddings).
ADDED_COND = "added_cond_kwargs"


@dataclass
class CallState:
    """Everything one call decides. ``scheduler`` is the call's own copy of the pipeline's scheduler
    (:meth:`~diffusekit.schedulers.scheduling_utils.SchedulerMixin.for_call`); ``denoiser_kwargs`` are
    extra keyword arguments of the denoiser (added conditioning, a ControlNet's residuals), which a
    pipeline may change at every step."""

    scheduler: Any = None
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    joint_attention_kwargs: dict[str, Any] | None = None
    denoiser_kwargs: dict[str, Any] = field(default_factory=dict)
    callback: Callable | None = None
    callback_names: Sequence[str] = ()
    num_timesteps: int | None = None
    denoising_start: float | None = None
    denoising_end: float | None = None
    current_timestep: Any = None
    interrupt: bool = False
    #: The call's compiled-step plan after ``pipe.compile(whole_step=True)`` (False: steps run eagerly).
    whole_step: Any = None

    @property
    def lora_scale(self) -> float | None:
        """The call's LoRA scale: ``scale`` in the cross- or joint-attention kwargs, else None."""
        options = self.cross_attention_kwargs or self.joint_attention_kwargs or {}
        return options.get("scale")

    def add_conditioning(self, **values: Any) -> None:
        """Merge ``values`` into the call's added conditioning (``denoiser_kwargs["added_cond_kwargs"]``)."""
        self.denoiser_kwargs[ADDED_COND] = {**self.denoiser_kwargs.get(ADDED_COND, {}), **values}


def pipeline_call(method: Callable) -> Callable:
    """Decorate a pipeline's ``__call__``: the state it registers with :func:`begin_call` is visible
    to the pipeline's :class:`CallField` properties in this thread until the call returns."""

    @functools.wraps(method)
    def run(pipe, *args, **kwargs):
        token = _CALLS.set({**_CALLS.get(), id(pipe): None})
        try:
            with cache_call_scope():  # the denoisers' caches (models/cache.py) start empty in each call
                return method(pipe, *args, **kwargs)
        finally:
            state = _CALLS.get().get(id(pipe))
            _CALLS.reset(token)
            if state is not None:
                _remember_finished(pipe, state)

    return run


def _remember_finished(pipe, state: CallState) -> None:
    """Keep ``state``'s settings (not its scheduler copy, tensors or callback) as ``pipe``'s last call here."""
    slim = dataclasses.replace(state, scheduler=None, denoiser_kwargs={}, callback=None)
    alive = {key: entry for key, entry in _FINISHED.get().items() if entry[0]() is not None}
    _FINISHED.set({**alive, id(pipe): (weakref.ref(pipe), slim)})


def begin_call(pipe, state: CallState) -> CallState:
    """Make ``state`` the state of ``pipe``'s running call (inside a :func:`pipeline_call`)."""
    calls = _CALLS.get()
    if id(pipe) not in calls:
        raise RuntimeError(f"{type(pipe).__name__}: begin_call outside a call; decorate __call__ with pipeline_call")
    _CALLS.set({**calls, id(pipe): state})
    return state


def current_call(pipe, finished: bool = False) -> CallState:
    """The state of ``pipe``'s call running in this thread (``finished``: else the last one that finished
    here); AttributeError when there is none."""
    state = _CALLS.get().get(id(pipe))
    if state is None and finished:
        ref, last = _FINISHED.get().get(id(pipe), (None, None))
        state = last if ref is not None and ref() is pipe else None
    if state is None:
        raise AttributeError(f"{type(pipe).__name__} has no call running in this thread; call-state properties "
                             "(guidance_scale, num_timesteps, interrupt, ...) exist only during a call and, "
                             "read-only, after it in the thread that made it")
    return state


class CallField:
    """A pipeline property reading field ``name`` of the running call's state (read-only unless
    ``writable``: the reference's ``pipe._interrupt = True`` idiom)."""

    def __init__(self, name: str, writable: bool = False) -> None:
        self.name, self.writable = name, writable

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, pipe, owner: type | None = None):
        if pipe is None:
            return self
        return getattr(current_call(pipe, finished=True), self.name)

    def __set__(self, pipe, value) -> None:
        if not self.writable:
            raise AttributeError(f"{type(pipe).__name__}.{self.attribute} is read-only")
        setattr(current_call(pipe), self.name, value)


class CallStateProperties:
    """The reference's call-state properties (and the private names its callbacks write)."""

    guidance_scale = CallField("guidance_scale")
    _guidance_scale = CallField("guidance_scale", writable=True)
    guidance_rescale = CallField("guidance_rescale")
    clip_skip = CallField("clip_skip")
    cross_attention_kwargs = CallField("cross_attention_kwargs")
    joint_attention_kwargs = CallField("joint_attention_kwargs")
    num_timesteps = CallField("num_timesteps")
    current_timestep = CallField("current_timestep")
    interrupt = CallField("interrupt")
    _interrupt = CallField("interrupt", writable=True)
