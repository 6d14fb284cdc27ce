"""ControlNets in the original single-file layout (lllyasviel's ``control_v11*`` files; inside a
full checkpoint under ``control_model.``): the config to build and the loading. The key names are
:func:`~diffusekit.loaders.single_file_layout.controlnet_name_map`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..configuration import read_json
from .single_file_layout import CONTROLNET_PREFIX
from .single_file_model import CONFIG_ROOT, detect_family, load_model, read_checkpoint, strip_prefix

#: The shipped ControlNet config of each family (a folder of ``assets/configs``).
SHIPPED_CONFIGS = {"sd1": "controlnet_sd1"}


def _shapes_from_file(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Config values the file itself tells: the latent and conditioning channels."""
    weights = strip_prefix(state, CONTROLNET_PREFIX) or state
    found = {}
    for name, keys in (("in_channels", ("input_blocks.0.0.weight", "conv_in.weight")),
                       ("conditioning_channels", ("input_hint_block.0.weight",
                                                  "controlnet_cond_embedding.conv_in.weight"))):
        for key in keys:
            if key in weights:
                found[name] = weights[key].shape[1]
    return found


def controlnet_config(state: dict[str, torch.Tensor], config: str | os.PathLike | dict | None,
                      subfolder: str | None, source: str, overrides: dict) -> dict:
    """The config to build: ``config`` (a dict, a model folder, or a pipeline folder with
    ``subfolder``, default ``controlnet``), else the shipped config of the file's family; the
    channel counts the file shows and ``overrides`` replace its entries."""
    if isinstance(config, dict):
        return {**config, **overrides}
    if config is None:
        family = detect_family(state)
        if family not in SHIPPED_CONFIGS:
            raise ValueError(f"{source}: no shipped ControlNet config for a {family} checkpoint; pass config= "
                             "(a ControlNet folder or config dict)")
        path = CONFIG_ROOT / SHIPPED_CONFIGS[family] / "config.json"
    else:
        folder = Path(config)
        if not (folder / "config.json").is_file():
            folder = folder / (subfolder or "controlnet")
        path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (config= must be a ControlNet folder or a pipeline folder "
                                "with a controlnet subfolder)")
    return {**read_json(path), **_shapes_from_file(state), **overrides}


def load_controlnet_single_file(model_cls, path: str | os.PathLike, config=None, subfolder: str | None = None,
                                torch_dtype: torch.dtype | None = None, **overrides: Any):
    """``model_cls`` (a ControlNet class) from an original-layout file, a full checkpoint holding
    ``control_model.*``, or a file in our layout."""
    source = str(path)
    state = read_checkpoint(path)
    model_config = controlnet_config(state, config, subfolder, source, overrides)
    return load_model(model_cls, state, model_config, source, torch_dtype)
