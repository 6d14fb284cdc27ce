"""Step-index bookkeeping shared by the schedulers.

The position in the schedule is a Python int, so ``step`` indexes its tables without reading a
tensor back from the device. The one host read is :meth:`StepIndexMixin.index_for_timestep`, done
at the first ``step``/``scale_model_input`` of a loop when no ``begin_index`` was set (it turns the
caller's timestep into a position, as the reference does).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


def like_timestep(value: int, timestep) -> int | torch.Tensor:
    """``value`` as a tensor when ``timestep`` is one (what the reference's ``previous_timestep`` returns)."""
    return torch.tensor(value) if isinstance(timestep, torch.Tensor) else value


class StepPlan(NamedTuple):
    """A scheduler's step as pure tensor functions, for a compiled whole denoising step
    (:mod:`diffusekit.pipelines.whole_step`); ``step_plan(device)`` of the schedulers that have one.

    ``coefficients`` holds one row per schedule position (on the device, made once per call);
    ``scale_input(sample, row)`` is ``scale_model_input`` and ``update(model_output, sample, row,
    constants)`` is ``step``'s ``prev_sample``, the very functions the eager ``step`` calls.
    ``constants`` are plain Python values (a compiled graph guards on them by value)."""

    coefficients: torch.Tensor
    scale_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]
    constants: tuple = ()


def unscaled_input(sample: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``scale_input`` of the schedulers that do not scale the model input."""
    return sample


class StepIndexMixin:
    """``step_index`` / ``begin_index`` and the timestep -> position lookup."""

    _step_index: int | None = None
    _begin_index: int | None = None
    #: Whether a timestep not in the schedule maps to the last step (else ``index_for_timestep`` refuses it).
    _missing_timestep_is_last = False
    timesteps: torch.Tensor

    @property
    def step_index(self) -> int | None:
        """Position of the next step in ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Position the loop starts at, when a pipeline set it (img2img); else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]`` (saves the first-step lookup)."""
        self._begin_index = begin_index

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _find_index(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int | None:
        """Position of ``timestep`` in the schedule (the second match when it appears twice, as in
        second-order schedules), or None when it is not in it. Reads one value back from the device."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule.device)
        matches = (schedule == timestep).nonzero()
        if len(matches) == 0:
            return None
        return int(matches[1 if len(matches) > 1 else 0].item())

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; one not in it is the last step where
        ``_missing_timestep_is_last`` (the reference's DPM-Solver family), else a ValueError."""
        index = self._find_index(timestep, schedule_timesteps)
        if index is not None:
            return index
        if self._missing_timestep_is_last:
            return len(self.timesteps) - 1
        raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps; pass one of scheduler.timesteps")

    def plan_position(self, timestep) -> int | None:
        """The schedule position the next step runs at, looked up as ``step`` does at a loop's first
        step (None for a timestep not in the schedule); :meth:`plan_advance` moves past it."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._find_index(timestep)
        return self._step_index

    def plan_advance(self) -> None:
        """Count a step made through a :class:`StepPlan` (what ``step`` does to ``step_index``)."""
        self._step_index += 1

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _noise_indices(self, timesteps: torch.Tensor, device: torch.device) -> list[int]:
        """Schedule positions used by ``add_noise``: looked up, or the current/begin index when set."""
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device)]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.shape[0]
