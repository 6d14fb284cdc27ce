"""What every scheduler shares: config files, ``compatibles``, the output type, the argument
checks of ``set_timesteps`` (made once here for every subclass), and per-call copies."""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..configuration import ConfigMixin, read_json
from ..hub import resolve_file
from ..utils import BaseOutput


@dataclass
class SchedulerOutput(BaseOutput):
    """The result of ``step``: the less noisy sample, and the model's estimate of the clean one."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def check_num_inference_steps(value, limit: int | None = None) -> None:
    """ValueError unless ``value`` is a positive int (bool refused), at most ``limit`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"num_inference_steps ({value}) cannot be larger than num_train_timesteps ({limit})")


def check_schedule_values(name: str, values) -> None:
    """ValueError unless a custom schedule (``timesteps`` / ``sigmas``) is a non-empty list of finite numbers."""
    try:
        array = np.asarray(values.cpu() if torch.is_tensor(values) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {type(values).__name__}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}")


def _checked_set_timesteps(set_timesteps: Callable) -> Callable:
    """``set_timesteps`` that first checks ``num_inference_steps``, ``timesteps`` and ``sigmas``."""
    signature = inspect.signature(set_timesteps)

    @functools.wraps(set_timesteps)
    def checked(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        steps = arguments.get("num_inference_steps")
        if steps is not None:
            limit = self.config.num_train_timesteps if self._steps_capped_by_training else None
            check_num_inference_steps(steps, limit)
        for name in ("timesteps", "sigmas"):
            if arguments.get(name) is not None:
                check_schedule_values(name, arguments[name])
        return set_timesteps(self, *args, **kwargs)

    checked.checks_arguments = True
    return checked


class SchedulerMixin(ConfigMixin):
    """Base of all schedulers: ``from_pretrained`` / ``save_pretrained`` of ``scheduler_config.json``.

    Every subclass's ``set_timesteps`` is wrapped to check its arguments first (ValueError naming
    them): ``num_inference_steps`` a positive int (at most ``num_train_timesteps`` where
    ``_steps_capped_by_training``), custom ``timesteps`` / ``sigmas`` non-empty and finite.
    """

    config_name = "scheduler_config.json"
    #: Names of the schedulers that can be built from this one's config (``from_config``).
    _compatibles: tuple[str, ...] = ()
    #: Whether ``num_inference_steps`` may not exceed ``num_train_timesteps`` (as the reference refuses).
    _steps_capped_by_training = False
    order = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("set_timesteps")
        if method is not None and not getattr(method, "checks_arguments", False):
            cls.set_timesteps = _checked_set_timesteps(method)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs: Any,
    ):
        """Build from ``scheduler_config.json`` in a folder or Hub repo; extra kwargs override keys."""
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub)
        return cls.from_config(read_json(path), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        self.save_config(save_directory)

    @property
    def compatibles(self) -> list[type]:
        """Scheduler classes that accept this scheduler's config."""
        import diffusekit

        classes = []
        for name in dict.fromkeys([type(self).__name__, *self._compatibles]):
            try:
                classes.append(getattr(diffusekit, name))
            except (AttributeError, ImportError):  # a reference scheduler diffusekit does not have
                continue
        return classes

    def for_call(self) -> "SchedulerMixin":
        """A copy for one sampling loop: config and tables shared, the step state its own.

        Schedulers replace (never modify in place) the tensors that ``set_timesteps`` and ``step``
        change, so a shallow copy shares the tables read-only; lists and dicts (histories such as
        ``model_outputs``) are copied, and nested schedulers (UniPC's ``solver_p``) copied the same way.
        Pipelines run on such a copy, so calls in several threads never share a step index.
        """
        clone = copy.copy(self)
        for name, value in vars(self).items():
            if type(value) in (list, dict):
                setattr(clone, name, type(value)(value))
            elif isinstance(value, SchedulerMixin):
                setattr(clone, name, value.for_call())
        return clone

    def __len__(self) -> int:
        return self.config.num_train_timesteps
