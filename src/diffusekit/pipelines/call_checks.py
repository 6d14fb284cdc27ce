"""Checks of the call arguments the pipelines share; each raises ValueError naming the argument.

Pipelines call :func:`check_call_arguments` with the arguments they take, by name, e.g.
``check_call_arguments(num_inference_steps=steps, guidance_scale=scale, strength=strength)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

from ..schedulers.scheduling_utils import check_num_inference_steps


def check_positive_int(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_finite_number(name: str, value: Any) -> None:
    """``value`` is a finite real number (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_strength(strength: Any, name: str = "strength") -> None:
    """``strength`` is a number in [0, 1] (NaN refused)."""
    check_finite_number(name, strength)
    if not 0 <= strength <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {strength}")


def check_prompt_text(name: str, text: Any) -> None:
    """``text`` is None, a str, or a non-empty list of str."""
    if text is None or isinstance(text, str):
        return
    if not isinstance(text, list):
        raise ValueError(f"{name} must be a str or a list of str, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{name} is an empty list; pass at least one prompt")
    wrong = [type(t).__name__ for t in text if not isinstance(t, str)]
    if wrong:
        raise ValueError(f"{name} must be a list of str, got items of type {sorted(set(wrong))}")


def check_image_size(height: Any, width: Any, multiple: int | None = None) -> None:
    """``height`` / ``width`` are None or positive ints; with ``multiple``, given ones divide by it."""
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_positive_int(name, value)
    if multiple and ((height or 0) % multiple or (width or 0) % multiple):
        raise ValueError(f"height and width must be divisible by {multiple}, got height={height} and width={width}")


def _check_steps(name: str, value: Any) -> None:
    check_num_inference_steps(value)


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "num_inference_steps": _check_steps,
    "num_images_per_prompt": check_positive_int,
    "batch_size": check_positive_int,
    "guidance_scale": check_finite_number,
    "true_cfg_scale": check_finite_number,
    "guidance_rescale": check_finite_number,
    "eta": check_finite_number,
    "strength": lambda name, value: check_strength(value, name),
}


def check_call_arguments(**arguments: Any) -> None:
    """Check each argument by its name (see ``_CHECKS``); None values are left to the pipeline."""
    for name, value in arguments.items():
        if value is not None:
            _CHECKS[name](name, value)
