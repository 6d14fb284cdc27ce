"""``DiffusionPipeline.from_pretrained`` options: ``dtype`` / ``torch_dtype`` (one dtype or one per component),
``variant`` checks and ``device_map`` placement, as the reference reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEFAULT_KEY = "default"
DEVICE_MAP_STRATEGIES = ("balanced",)


def requested_dtype(kwargs: dict) -> torch.dtype | dict | None:
    """Pop ``dtype`` and its older name ``torch_dtype`` from ``kwargs``; ValueError when both differ."""
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"from_pretrained got dtype={dtype} and torch_dtype={torch_dtype}; pass only dtype")
    chosen = dtype if dtype is not None else torch_dtype
    if isinstance(chosen, dict):
        bad = {k: v for k, v in chosen.items() if not isinstance(v, torch.dtype)}
        if bad:
            raise ValueError(f"dtype dict values must be torch dtypes, got {bad}")
    elif chosen is not None and not isinstance(chosen, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or a dict of them by component, got {chosen!r}")
    return chosen


def component_dtype(dtype: torch.dtype | dict | None, name: str) -> torch.dtype | None:
    """The dtype for component ``name``: a dict's entry, else its ``"default"``, else float32."""
    if isinstance(dtype, dict):
        return dtype.get(name, dtype.get(DEFAULT_KEY, torch.float32))
    return dtype


def check_variant(folder: Path, components: list[str], variant: str) -> None:
    """ValueError (the reference's wording) when no component folder has a file of ``variant``."""
    for name in components:
        if any(f".{variant}." in p.name for p in (folder / name).glob("*") if p.is_file()):
            return
    raise ValueError(f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                     f"files are available in {folder} (components {components}).")


def check_device_map(device_map: Any) -> None:
    """ValueError unless ``device_map`` is None, a strategy name, a device or a dict of devices by component."""
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return
    if isinstance(device_map, dict):
        for device in device_map.values():
            torch.device(device)
        return
    try:
        torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must be one of {DEVICE_MAP_STRATEGIES}, a device or a dict of devices by "
                         f"component, got {device_map!r}") from None


def _balanced(modules: dict[str, torch.nn.Module]) -> dict[str, torch.device]:
    """Components spread over the accelerators, largest first onto the least loaded one."""
    count = torch.cuda.device_count()
    if count == 0:
        return {name: torch.device("cpu") for name in modules}
    load = [0] * count
    placement = {}
    sizes = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in modules.items()}
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        index = min(range(count), key=load.__getitem__)
        load[index] += sizes[name]
        placement[name] = torch.device("cuda", index)
    return placement


def place_components(components: dict[str, Any], device_map: Any) -> dict[str, torch.device]:
    """Move the module components per ``device_map``; returns where each went."""
    modules = {n: c for n, c in components.items() if isinstance(c, torch.nn.Module)}
    if device_map == "balanced":
        placement = _balanced(modules)
    elif isinstance(device_map, dict):
        placement = {n: torch.device(device_map[n]) for n in modules if n in device_map}
    else:
        placement = {n: torch.device(device_map) for n in modules}
    for name, device in placement.items():
        modules[name].to(device)
    return placement
