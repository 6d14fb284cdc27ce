"""Scheduler plumbing shared by the pipelines: timestep schedules, img2img strength, step options."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..utils import Generator
from .call_checks import check_strength


def _takes(method, name: str) -> bool:
    return name in inspect.signature(method).parameters


def retrieve_timesteps(scheduler, num_inference_steps: int | None = None, device: torch.device | str | None = None,
                       timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, int]:
    """Call ``scheduler.set_timesteps`` and return ``(scheduler.timesteps, number of steps)``.

    Custom ``timesteps`` or ``sigmas`` (one of them) go to schedulers whose ``set_timesteps`` takes
    them; otherwise ValueError. Extra keyword arguments are passed on (e.g. ``mu``).
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either timesteps or sigmas, not both")
    for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
        if values is None:
            continue
        if not _takes(scheduler.set_timesteps, name):
            raise ValueError(f"{type(scheduler).__name__}.set_timesteps does not take custom {name}; "
                             "use a scheduler that does or pass num_inference_steps")
        scheduler.set_timesteps(**{name: values}, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, num_inference_steps


def timesteps_for_strength(scheduler, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """The tail of the schedule that image-to-image runs: the last ``int(steps * strength)`` steps.

    Tells the scheduler where it starts (``set_begin_index``) and returns ``(timesteps, steps left)``.
    """
    check_strength(strength)
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - kept, 0)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps, num_inference_steps - start


def step_kwargs(scheduler, generator: Generator = None, eta: float = 0.0) -> dict[str, Any]:
    """``eta`` and ``generator`` for ``scheduler.step``, each only if the step takes it."""
    extra: dict[str, Any] = {}
    if _takes(scheduler.step, "eta"):
        extra["eta"] = eta
    if _takes(scheduler.step, "generator"):
        extra["generator"] = generator
    return extra


def warmup_steps(timesteps: torch.Tensor, num_inference_steps: int, scheduler) -> int:
    """Steps before the progress bar counts (schedulers of order > 1 run extra model calls)."""
    return len(timesteps) - num_inference_steps * scheduler.order


def progress_due(step: int, timesteps: torch.Tensor, warmup: int, scheduler) -> bool:
    """Whether the progress bar advances after loop step ``step``: the last step, and after the
    warm-up every ``scheduler.order``-th model call."""
    return step == len(timesteps) - 1 or (step + 1 > warmup and (step + 1) % scheduler.order == 0)


def is_denoising_fraction(value: Any) -> bool:
    """Whether ``denoising_start`` / ``denoising_end`` is in effect: a float strictly between 0 and 1
    (the reference ignores anything else)."""
    return isinstance(value, float) and 0 < value < 1


def _cutoff_timestep(scheduler, fraction: float) -> int:
    """The training timestep at which ``fraction`` of the denoising is done."""
    train_steps = scheduler.config.num_train_timesteps
    return int(round(train_steps - fraction * train_steps))


def timesteps_until(scheduler, timesteps: torch.Tensor, num_inference_steps: int,
                    denoising_end: float | None) -> tuple[torch.Tensor, int]:
    """``(timesteps, steps)`` up to ``denoising_end`` of the denoising (the base half of a
    base-to-refiner hand-off); unchanged when the fraction is not in effect."""
    if not is_denoising_fraction(denoising_end):
        return timesteps, num_inference_steps
    cutoff = _cutoff_timestep(scheduler, denoising_end)
    count = int(sum(1 for t in timesteps if t >= cutoff))
    return timesteps[:count], count


def timesteps_from(scheduler, denoising_start: float) -> tuple[torch.Tensor, int]:
    """The tail of ``scheduler``'s schedule that starts after ``denoising_start`` of the denoising
    (the refiner half of a hand-off); tells the scheduler where it begins. A second-order scheduler
    gets one step more when the count is even, so that it starts on a full step."""
    cutoff = _cutoff_timestep(scheduler, denoising_start)
    count = int((scheduler.timesteps < cutoff).sum().item())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    start = len(scheduler.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:], count
