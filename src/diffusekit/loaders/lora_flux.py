"""FLUX.1 LoRAs written against Black Forest Labs' module names, renamed to diffusekit's.

Community trainers save FLUX LoRAs in the original (BFL) model's names rather than diffusers':

* kohya / sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (``lora_te1_`` / ``lora_te_`` keys for CLIP are handled by the generic kohya rules);
* BFL / ComfyUI / ai-toolkit: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` /
  ``.lora_B.weight`` (or ``.lora_down`` / ``.lora_up``, ``.alpha``); CLIP keys under
  ``text_encoders.clip_l.transformer.``;
* BFL control LoRAs (FLUX.1 Canny/Depth [dev] LoRA): the same names without a prefix, ``.lora_B.bias``
  keys, and the q/k norm scales (``double_blocks.N.img_attn.norm.query_norm.scale`` -> ``norm_q``,
  ``key_norm`` -> ``norm_k``, ``txt_attn`` -> ``norm_added_q/k``, ``single_blocks.N.norm.*`` ->
  ``norm_q/k``); recognised by their ``query_norm.scale`` keys.

Rules (a BFL name, dots or underscores, -> layers of ``FluxTransformer2DModel``):

* ``double_blocks.N.``: ``img_attn.qkv`` -> ``attn.to_q/to_k/to_v``; ``txt_attn.qkv`` ->
  ``attn.add_q_proj/add_k_proj/add_v_proj``; ``img_attn.proj`` -> ``attn.to_out.0``; ``txt_attn.proj``
  -> ``attn.to_add_out``; ``img_mlp.0/.2`` -> ``ff.net.0.proj`` / ``ff.net.2``; ``txt_mlp.*`` -> the same
  under ``ff_context``; ``img_mod.lin`` / ``txt_mod.lin`` -> ``norm1.linear`` / ``norm1_context.linear``
  (``transformer_blocks.N``).
* ``single_blocks.N.``: ``linear1`` -> ``attn.to_q/to_k/to_v`` + ``proj_mlp``; ``linear2`` -> ``proj_out``;
  ``modulation.lin`` -> ``norm.linear`` (``single_transformer_blocks.N``).
* ``img_in`` / ``txt_in`` -> ``x_embedder`` / ``context_embedder``; ``time_in``, ``vector_in``,
  ``guidance_in`` ``.in_layer/.out_layer`` -> ``time_text_embed.{timestep,text,guidance}_embedder.linear_1/2``;
  ``final_layer.linear`` -> ``proj_out``; ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with
  the two halves of the up matrix swapped (BFL emits shift, scale; diffusers scale, shift).
* A fused projection (qkv, linear1) becomes one adapter per target layer: the down matrix shared,
  the up matrix cut by rows into the targets' output sizes (read from the model, so any width works).
  The result is the same function as the fused LoRA.
* alpha: the file's ``.alpha``, else the rank, kept per target (scale alpha / rank). The reference
  ignores the alphas of ``final_layer`` keys; they are honoured here.

Control LoRAs (FLUX.1 Canny/Depth [dev] as LoRAs, diffusers layout) turn a FLUX.1 transformer into
one that takes the control latents next to its own (:func:`prepare_control_lora`):

* a ``lora_A`` with more input features than its Linear layer widens the layer: the new input
  columns are zeros, so the layer's function on the old inputs is unchanged, and for ``x_embedder``
  the config's ``in_channels`` follows. ``unload_lora_weights(reset_to_overwritten_params=True)``
  puts the original weight tensor and config back (without it the layer stays wide, as in the
  reference). A layer that already carries adapters is not widened (ValueError);
* a ``lora_A`` with fewer input features than its layer (a FLUX.1 LoRA on a widened or a Fill/Control
  transformer) is padded with zero columns;
* ``<block>.attn.norm_q/norm_k/norm_added_q/norm_added_k.weight`` keys replace those RMSNorm weights;
  every ``unload_lora_weights`` puts the original tensors back.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

import torch
from torch import nn

from ..weights import WeightsError
from .lora_layers import LoraLayer

logger = logging.getLogger(__name__)

_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation_lin": ("norm.linear",),
}
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
    **{f"{bfl}_{io}_layer": f"time_text_embed.{ours}_embedder.linear_{n}"
       for bfl, ours in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance"))
       for io, n in (("in", 1), ("out", 2))},
}
_SWAP_HALVES = {"norm_out.linear"}
_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(.+)")
_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_down\.weight|lora_up\.weight|alpha)$")
_ROLE = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
         "lora_B.bias": "up_bias", "alpha": "alpha"}
_PREFIXES = ("lora_unet_", "diffusion_model.")
#: BFL's control LoRAs (FLUX.1 Canny/Depth [dev] LoRA) have unprefixed keys and carry the q/k norm scales.
_NORM_SCALE = re.compile(r"(double|single)_blocks\.(\d+)\.(?:(img|txt)_attn\.)?norm\.(query|key)_norm\.scale")
_CLIP_PREFIX = "text_encoders.clip_l.transformer."


def is_flux_transformer(model: nn.Module | None) -> bool:
    return model is not None and hasattr(model, "single_transformer_blocks") and hasattr(model, "transformer_blocks")


def _targets(name: str) -> tuple[str, ...] | None:
    """diffusekit layer paths for an underscored BFL module name, or None."""
    match = _BLOCK.fullmatch(name)
    if match:
        kind, index, rest = match.groups()
        table, block = (_DOUBLE, "transformer_blocks") if kind == "double" else (_SINGLE, "single_transformer_blocks")
        paths = table.get(rest)
        return tuple(f"{block}.{index}.{p}" for p in paths) if paths else None
    return (_TOP[name],) if name in _TOP else None


def _norm_scale_key(key: str, prefixes: tuple[str, ...]) -> str | None:
    """The diffusers-layout key of a BFL q/k norm scale (``double_blocks.0.img_attn.norm.query_norm.scale``), else None."""
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    match = None if prefix is None else _NORM_SCALE.fullmatch(key[len(prefix):])
    if match is None or (match.group(1) == "double") != (match.group(3) is not None):
        return None
    kind, index, stream, which = match.groups()
    names = ("norm_added_q", "norm_added_k") if stream == "txt" else ("norm_q", "norm_k")
    block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
    return f"transformer.{block}.{index}.attn.{names[which == 'key']}.weight"


def _split_bfl_key(key: str, prefixes: tuple[str, ...] = _PREFIXES) -> tuple[str, str] | None:
    """``(underscored BFL module name, role)`` for a kohya-FLUX or BFL key, else None."""
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    match = _SUFFIX.search(key)
    if prefix is None or match is None:
        return None
    name = key[len(prefix): match.start()].replace(".", "_")
    return (name, _ROLE[match.group(1)]) if _targets(name) else None


def convert_flux_lora(state: dict[str, torch.Tensor], transformer: nn.Module,
                      source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state with FLUX original names turned into diffusers-layout transformer keys, {new key: original key})``.

    Keys that are not FLUX original names pass through unchanged; fused LoRAs whose rows do not add
    up to their target layers raise ValueError naming the key.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    keys_of: dict[str, list[str]] = {}
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    control = any(key.endswith("query_norm.scale") for key in state)
    prefixes = (*_PREFIXES, "") if control else _PREFIXES
    for key, tensor in state.items():
        norm_key = _norm_scale_key(key, prefixes)
        if norm_key is not None:
            out[norm_key], origin[norm_key] = tensor, key
            continue
        split = _split_bfl_key(key, prefixes)
        if split is None:
            new_key = "text_encoder." + key[len(_CLIP_PREFIX):] if key.startswith(_CLIP_PREFIX) else key
            out[new_key], origin[new_key] = tensor, key
            continue
        name, role = split
        if role in modules.setdefault(name, {}):
            raise WeightsError(f"{source}: LoRA key {key!r} repeats the {role} of {name!r} given by {keys_of[name]}")
        modules[name][role] = tensor
        keys_of.setdefault(name, []).append(key)
    for name, tensors in modules.items():
        targets, keys = _targets(name), keys_of[name]
        if "down" not in tensors or "up" not in tensors:
            out.update({k: state[k] for k in keys})  # incomplete: reported as matching no layer
            origin.update({k: k for k in keys})
            continue
        down, up = tensors["down"], tensors["up"]
        alpha = tensors.get("alpha", torch.tensor(float(down.shape[0])))
        try:
            sizes = [transformer.get_submodule(t).weight.shape[0] for t in targets]
        except AttributeError:
            out.update({k: state[k] for k in keys})
            origin.update({k: k for k in keys})
            continue
        if sum(sizes) != up.shape[0]:
            raise ValueError(f"{source}: {keys[0]}: the up matrix has {up.shape[0]} rows but the layers "
                             f"{list(targets)} it feeds have {sizes} outputs")
        biases = torch.split(tensors["up_bias"], sizes) if "up_bias" in tensors else [None] * len(sizes)
        for target, part, bias in zip(targets, torch.split(up, sizes), biases):
            if target in _SWAP_HALVES:
                part, bias = (None if t is None else torch.cat(t.chunk(2)[::-1]) for t in (part, bias))
            prefix = f"transformer.{target}."
            for suffix, value in (("lora_A.weight", down), ("lora_B.weight", part), ("lora_B.bias", bias),
                                  ("alpha", alpha)):
                if value is not None:
                    out[prefix + suffix], origin[prefix + suffix] = value, keys[0]
    return out, origin


# -- control LoRAs -----------------------------------------------------------------------------

#: Config keys that follow a widened layer's input width (by the layer's own name).
_WIDTH_CONFIG = {"x_embedder": "in_channels"}
_NORM_KEY = re.compile(r"(?:transformer\.)?(.+\.(?:norm_q|norm_k|norm_added_q|norm_added_k))\.weight")
_LORA_A = re.compile(r"(?:transformer\.)?(.+)\.lora_A\.weight")
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "unet.")


def _lora_a_targets(state: dict[str, torch.Tensor], transformer: nn.Module) -> Iterator[tuple[str, str, nn.Linear]]:
    """``(key, layer name, layer)`` for the transformer's Linear layers that ``lora_A`` keys of ``state`` name."""
    for key in state:
        match = _LORA_A.fullmatch(key)
        if match is None or key.startswith(_OTHER_COMPONENTS):
            continue
        try:
            module = transformer.get_submodule(match.group(1))
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            yield key, match.group(1), module


class LoraShapeError(ValueError, RuntimeError):
    """A LoRA whose shapes do not fit a layer (a RuntimeError too, as torch's "size mismatch" errors are)."""


def _widen(transformer: nn.Module, name: str, module: nn.Linear, in_features: int, key: str, source: str,
           adapter_name: str) -> None:
    """Give ``module`` ``in_features`` inputs (new weight columns are zeros); the original is kept for restoring."""
    if isinstance(module, LoraLayer):
        raise LoraShapeError(f"{source}: size mismatch for {name}.lora_A.{adapter_name}.weight ({key}): it needs "
                             f"{name} widened from {module.in_features} to {in_features} input features, but that "
                             f"layer already carries LoRA adapters {list(module.lora_adapters)}; load the widening "
                             "LoRA first (or unload the others)")
    old = module.weight
    weight = torch.zeros(old.shape[0], in_features, dtype=old.dtype, device=old.device)
    weight[:, : old.shape[1]] = old.detach()
    config_key = _WIDTH_CONFIG.get(name.rpartition(".")[2])
    old_config = {config_key: transformer.config[config_key]} if config_key else {}
    transformer.__dict__.setdefault("_widened_layers", {}).setdefault(name, (old, module.in_features, old_config))
    logger.debug('Expanding the nn.Linear input/output features for module="%s" for a control LoRA: its input '
                 "features go from %d to %d (the new weight columns are zeros)", name, module.in_features, in_features)
    module.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    module.in_features = in_features
    if config_key:
        transformer.register_to_config(**{config_key: in_features})


def _pad_columns(down: torch.Tensor, in_features: int) -> torch.Tensor:
    padded = torch.zeros(down.shape[0], in_features, dtype=down.dtype, device=down.device)
    padded[:, : down.shape[1]] = down
    return padded


def _split_norm_weights(state: dict[str, torch.Tensor], transformer: nn.Module,
                        source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(the rest of state, {norm layer name: weight})`` for the transformer's norms that ``state`` replaces."""
    rest, norms = {}, {}
    for key, tensor in state.items():
        match = _NORM_KEY.fullmatch(key)
        module = None
        if match is not None and not key.startswith(_OTHER_COMPONENTS):
            with contextlib.suppress(AttributeError):
                module = transformer.get_submodule(match.group(1))
        if getattr(module, "weight", None) is None:
            rest[key] = tensor  # not a norm of this model: reported as matching no layer
            continue
        if tuple(tensor.shape) != tuple(module.weight.shape):
            raise ValueError(f"{source}: {key}: shape {tuple(tensor.shape)} does not fit the layer's weight "
                             f"{tuple(module.weight.shape)}")
        norms[match.group(1)] = tensor
    return rest, norms


def prepare_control_lora(transformer: nn.Module, state: dict[str, torch.Tensor], source: str,
                         adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """``(state without norm weights and with narrow lora_A padded, {norm layer: weight}, widened layer names)``;
    widens the layers that wider ``lora_A`` keys need (see the module docstring)."""
    state, norms = _split_norm_weights(state, transformer, source)
    if norms:
        logger.info("The provided state dict contains normalization layers in addition to LoRA layers (%s: %d "
                    "weights). They replace the transformer's norm weights until unload_lora_weights() puts the "
                    "originals back.", source, len(norms))
    widened, padded = [], []
    with undo_widening_on_error(transformer, widened):  # a refused layer undoes the widenings before it
        for key, name, module in list(_lora_a_targets(state, transformer)):
            width = state[key].shape[1]
            if width > module.in_features:
                _widen(transformer, name, module, width, key, source, adapter_name)
                widened.append(name)
            elif width < module.in_features:
                padded.append(name)
                state = {**state, key: _pad_columns(state[key], module.in_features)}
    if padded:
        logger.info("The following LoRA modules were zero padded to match the state dict of transformer: %s "
                    "(%s: their lora_A has fewer input features than the layer)", padded, source)
    return state, norms, widened


@contextlib.contextmanager
def undo_widening_on_error(transformer: nn.Module | None, widened: list[str]) -> Iterator[None]:
    """Within the block, an error restores the layers named in ``widened`` before it propagates."""
    try:
        yield
    except BaseException:
        if widened:
            restore_widened(transformer, widened)
        raise


def restore_widened(transformer: nn.Module, names: list[str] | None = None) -> None:
    """Put back the original weights (and config values) of the widened layers (``names``, default all)."""
    saved = transformer.__dict__.get("_widened_layers", {})
    for name in list(saved) if names is None else names:
        weight, in_features, config = saved.pop(name)
        module = transformer.get_submodule(name)
        module.weight, module.in_features = _like(weight, module.weight), in_features
        if config:
            transformer.register_to_config(**config)
    if not saved:
        transformer.__dict__.pop("_widened_layers", None)


def replace_norms(transformer: nn.Module, norms: dict[str, torch.Tensor]) -> None:
    """Use the LoRA's norm weights; the originals are kept for :func:`restore_norms`."""
    saved = transformer.__dict__.setdefault("_replaced_norms", {})
    for name, value in norms.items():
        module = transformer.get_submodule(name)
        old = module.weight
        saved.setdefault(name, old)
        module.weight = nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)


def restore_norms(transformer: nn.Module) -> None:
    for name, weight in transformer.__dict__.pop("_replaced_norms", {}).items():
        module = transformer.get_submodule(name)
        module.weight = _like(weight, module.weight)


def _like(saved: nn.Parameter, current: torch.Tensor) -> nn.Parameter:
    """The saved original itself, or a copy on the device and dtype the model moved to since."""
    if saved.device == current.device and saved.dtype == current.dtype:
        return saved
    return nn.Parameter(saved.detach().to(device=current.device, dtype=current.dtype), requires_grad=saved.requires_grad)


def unload_control_lora(model: nn.Module, reset_to_overwritten_params: bool) -> None:
    """What ``unload_lora_weights`` undoes besides the adapters: replaced norms always, widened layers on request."""
    restore_norms(model)
    if reset_to_overwritten_params:
        restore_widened(model)


__all__ = ["convert_flux_lora", "is_flux_transformer", "prepare_control_lora", "replace_norms",
           "undo_widening_on_error", "unload_control_lora"]
