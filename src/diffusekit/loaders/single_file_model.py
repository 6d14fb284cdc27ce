"""One model out of a single-file checkpoint: reading the file, picking the model's part and
converting its keys. Knows no model class: a model says which part it is through its
``single_file_component`` (a key of :data:`PARTS`), and :class:`FromOriginalModelMixin` gives it
``from_single_file``. The pipeline-level loader that knows the models is
:mod:`~diffusekit.loaders.single_file`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..configuration import read_json
from ..weights import WeightsError, load_file
from . import single_file_layout as layout

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "assets" / "configs"


@dataclass(frozen=True)
class Part:
    """Where a model lives in a full checkpoint and how its keys are named there."""

    label: str  # for error messages
    prefix: str
    marker: str  # a key only our (diffusers) layout has
    name_map: Callable[[Any], dict[str, str]]
    dropped_prefixes: tuple[str, ...] = ()
    has_ema: bool = False


PARTS = {
    "unet": Part("UNet", layout.UNET_PREFIX, "conv_in.weight", layout.unet_name_map, has_ema=True),
    "vae": Part("VAE", layout.VAE_PREFIX, "encoder.conv_norm_out.weight", layout.vae_name_map,
                dropped_prefixes=("loss.",)),
    "controlnet": Part("ControlNet", layout.CONTROLNET_PREFIX, "controlnet_cond_embedding.conv_in.weight",
                       layout.controlnet_name_map),
}


# -- reading --------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint (a Lightning ``state_dict`` wrapper is unpacked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (from_single_file needs a .safetensors or .ckpt file)")
    state = load_file(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: no tensors in the checkpoint")
    return tensors


def use_ema(state: dict[str, torch.Tensor], extract_ema: bool | None, source) -> dict[str, torch.Tensor]:
    """UNet weights replaced by their EMA copies when the file has them (and ``extract_ema`` is not False)."""
    has_ema = any(k.startswith(layout.EMA_PREFIX) for k in state)
    if extract_ema and not has_ema:
        raise WeightsError(f"{source}: extract_ema=True but the checkpoint has no model_ema.* weights")
    if not has_ema or extract_ema is False:
        return state
    logger.info("%s: using the EMA weights of the UNet (pass extract_ema=False for the others)", source)
    result = dict(state)
    for key in state:
        if key.startswith(layout.UNET_PREFIX) and layout.ema_key(key) in state:
            result[key] = state[layout.ema_key(key)]
    return result


#: UNet-only files: the family by cross-attention width (anything else is SD 1.x).
_CROSS_ATTENTION_FAMILIES = {2048: "sdxl", 1280: "sdxl_refiner", 1024: "sd2"}


def detect_family(state: dict[str, torch.Tensor]) -> str:
    """The family (a folder of shipped configs) by the text-encoder prefixes the checkpoint holds
    (:data:`~.single_file_layout.FAMILY_TEXT_ENCODERS`), else by the UNet's cross-attention width."""
    family = layout.family_of_prefixes(state)
    if family is not None:
        return family
    for key, tensor in state.items():
        if key.endswith("attn2.to_k.weight") and tensor.ndim == 2:
            return _CROSS_ATTENTION_FAMILIES.get(tensor.shape[1], "sd1")
    return "sd1"


def conv_in_channels(state: dict[str, torch.Tensor]) -> int | None:
    """The input channels of the checkpoint's UNet (9 for inpainting), or None without a UNet."""
    for key in (f"{layout.UNET_PREFIX}input_blocks.0.0.weight", "conv_in.weight"):
        if key in state:
            return state[key].shape[1]
    return None


def component_config(component: str, family: str, folder: Path | None, overrides: dict | None = None) -> dict:
    """The config of ``component`` from ``folder/component`` (``folder`` itself when it is a model
    folder) or the shipped family configs."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    root = folder if folder is not None else CONFIG_ROOT / family
    path = root / name if (root / name).is_file() and component != "scheduler" else root / component / name
    config = read_json(path)
    config.update(overrides or {})
    return config


# -- state dict conversion ------------------------------------------------------------------------


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_keys(expected: dict[str, torch.Tensor], original: dict[str, torch.Tensor], rename, source,
                 what: str, strict_extra: bool = True) -> dict[str, torch.Tensor]:
    """Pick our keys out of ``original`` (no prefix) with ``rename(our key) -> original key``."""
    result, missing, used = {}, [], set()
    for key, target in expected.items():
        name = rename(key)
        if name is None or name not in original:
            missing.append(f"{key} (original {name})")
            continue
        result[key] = layout.reshape_like(original[name], target.shape)
        used.add(name)
    extra = sorted(set(original) - used)
    problems = []
    if missing:
        problems.append(f"missing {clip_list(missing)}")
    if extra and strict_extra:
        problems.append(f"unexpected {clip_list(extra)}")
    if problems:
        raise WeightsError(f"{source}: the {what} weights do not fit its config: " + "; ".join(problems))
    return result


def clip_list(items: list[str], limit: int = 12) -> str:
    """``items`` for an error message, at most ``limit`` of them."""
    return "[" + ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") + "]"


def _on_meta(model_cls, config: dict):
    from ..models.modeling import skip_init

    with skip_init(device="meta"):
        return model_cls.from_config(config)


def _expected(model_cls, config: dict) -> dict[str, torch.Tensor]:
    return _on_meta(model_cls, config).state_dict()


def load_model(model_cls, state: dict[str, torch.Tensor], config: dict, source, dtype=None):
    """``model_cls`` (its ``single_file_component`` names the part) built from ``config`` with the
    weights of that part of ``state``: a full checkpoint, a bare original-layout file or our layout."""
    component = model_cls.single_file_component
    part = PARTS[component]
    weights = strip_prefix(state, part.prefix) or state
    if part.marker not in weights:
        names = part.name_map(config)
        weights = {k: v for k, v in weights.items() if not k.startswith(part.dropped_prefixes)}
        weights = convert_keys(_expected(model_cls, config), weights, lambda k: layout.to_original(k, names),
                               source, part.label)
    model = _on_meta(model_cls, config)
    model.load_checked_state_dict(weights, source=source, dtype=dtype)
    return model.eval()


class FromOriginalModelMixin:
    """``from_single_file`` for a model alone; the class sets ``single_file_component`` (``"unet"``, ``"vae"``)."""

    single_file_component: str

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, config: str | os.PathLike | dict | None = None,
                         subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                         extract_ema: bool | None = None, **kwargs: Any):
        """The model from a full SD checkpoint, a bare original-layout file, or a file in our layout.

        ``config``: a dict, a model folder, or a pipeline folder (``subfolder`` defaults to the
        component); default: the shipped config of the detected SD family. Other keyword
        arguments override config entries.
        """
        source = str(pretrained_model_link_or_path)
        component = cls.single_file_component
        state = read_checkpoint(pretrained_model_link_or_path)
        if PARTS[component].has_ema:
            state = use_ema(state, extract_ema, source)
        if isinstance(config, dict):
            model_config = {**config, **kwargs}
        else:
            folder = Path(config) if config is not None else None
            if folder is not None and subfolder:
                folder = folder / subfolder
            overrides = dict(kwargs)
            channels = conv_in_channels(state)
            if component == "unet" and channels is not None:
                overrides.setdefault("in_channels", channels)
            model_config = component_config(component, detect_family(state), folder, overrides)
        return load_model(cls, state, model_config, source, torch_dtype)
