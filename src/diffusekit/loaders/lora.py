"""LoRA files for pipelines: ``pipe.load_lora_weights(...)`` and friends (:class:`LoraLoaderMixin`).

Layouts read (one file may mix them):

* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (optionally ``lora_B.bias``),
  the older ``<module>.lora.down.weight`` / ``.lora.up.weight`` / ``.lora_linear_layer.down.weight``
  and attention-processor keys ``<attn>.processor.to_q_lora.down.weight``; component prefixes
  ``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.`` (keys without one go to the
  denoiser). Alphas come from the safetensors metadata ``lora_adapter_metadata`` (``unet.lora_alpha``,
  ``unet.alpha_pattern`` ...) when present.
* kohya / A1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` and ``lora_te_`` (``lora_te1_``, ``lora_te2_``) for the text encoders. Underscored names
  are matched against the model's own module names, so every Linear/Conv2d layer is reachable; a
  UNet's layers also answer to their original SGM names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
  ``..._middle_block_0_in_layers_2``, ``..._label_emb_0_0``: SDXL kohya LoRAs), by the single-file
  layout rules (:mod:`~diffusekit.loaders.single_file_layout`).
* FLUX.1 LoRAs in the original model's names (kohya ``lora_unet_double_blocks_0_img_attn_qkv...``,
  BFL/ComfyUI ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``): renamed first, fused
  qkv / linear1 LoRAs split per layer; the rules are in :mod:`~diffusekit.loaders.lora_flux`.

Scale of an adapter on a layer: ``alpha / rank`` (alpha = rank when the file has none, as the
reference). Keys that reach no layer raise :class:`~diffusekit.weights.WeightsError` listing them
(``strict=False``: a warning listing them); a file of which nothing applies is always an error.
The layers themselves are in :mod:`~diffusekit.loaders.lora_layers`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import resolve_first_file, split_hub_kwargs
from ..weights import WeightsError, check_safetensors_header, load_file
from . import adapter_layers as adapters
from . import lora_flux, lora_hotswap, lora_layers as layers
from . import single_file_layout
from .lora_flux import convert_flux_lora, is_flux_transformer

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = adapters.METADATA_KEY
#: Pipeline components LoRA can target, in the order the denoiser is looked for.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "transformer", "lora_te_": "text_encoder",
                   "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# (suffix pattern, role); the module id is what precedes the suffix
_SUFFIXES = [
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$"), "up_bias"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
]
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


@dataclass
class _Entry:
    """The tensors of one target layer as read from the file."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


def read_lora_file(path_or_dict: str | os.PathLike | dict, weight_name: str | None = None,
                   **hub_kwargs) -> tuple[dict[str, torch.Tensor], dict, str]:
    """``(state dict, adapter metadata, source name)`` from a dict, a file, a folder or a Hub repo."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), {}, "LoRA state dict"
    path = Path(path_or_dict)
    if not path.is_file():
        path = resolve_first_file(path_or_dict, [weight_name] if weight_name else LORA_WEIGHT_NAMES, "LoRA",
                                  **hub_kwargs)
    metadata: dict = {}
    if path.suffix == ".safetensors":
        raw = (check_safetensors_header(path).get("__metadata__") or {}).get(METADATA_KEY)
        if raw:
            try:
                metadata = json.loads(raw)
            except json.JSONDecodeError:
                raise WeightsError(f"{path}: corrupt {METADATA_KEY} in the safetensors metadata") from None
    return load_file(path), metadata, str(path)


def check_lora_values(state: dict, source: str) -> None:
    """ValueError naming ``source`` and the key: a tensor with NaN/inf, or an ``alpha`` that is not one number."""
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if key.endswith(".alpha") and tensor.numel() != 1:
            raise WeightsError(f"{source}: {key} must be a single number (the LoRA alpha), "
                               f"got a tensor of shape {tuple(tensor.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{source}: {key} holds NaN or infinite values")


def _finite_alpha(value: Any, name: str, source: str) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = math.nan
    if not math.isfinite(alpha):
        raise WeightsError(f"{source}: the metadata's {name} must be a finite number, got {value!r}")
    return alpha


def _split_key(key: str) -> tuple[str, str] | None:
    for pattern, role in _SUFFIXES:
        match = pattern.search(key)
        if match:
            return key[: match.start()], role
    return None


def group_lora_keys(state: dict[str, torch.Tensor], components: list[str]) -> tuple[dict, list[str]]:
    """``({component: {module id: _Entry}}, unrecognised keys)``.

    A module id is a dotted module path, or (kohya) an underscored one prefixed by ``_``.
    """
    grouped: dict[str, dict[str, _Entry]] = collections.defaultdict(dict)
    unknown = []
    denoiser = next((c for c in components if c in ("unet", "transformer")), components[0] if components else "unet")
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None or not isinstance(tensor, torch.Tensor):
            unknown.append(key)
            continue
        module_id, role = split
        kohya = next((p for p in _KOHYA_PREFIXES if module_id.startswith(p)), None)
        if kohya is not None:
            component = _KOHYA_PREFIXES[kohya]
            component = denoiser if component in ("unet", "transformer") else component
            module_id = "_" + module_id[len(kohya):]
        else:
            head, _, rest = module_id.partition(".")
            component, module_id = (head, rest) if head in LORA_COMPONENTS and rest else (denoiser, module_id)
            match = _PROCESSOR_KEY.search(module_id)
            if match:
                target = "to_out.0" if match.group(1) == "to_out" else match.group(1)
                module_id = module_id[: match.start()] + "." + target
        entry = grouped[component].setdefault(module_id, _Entry())
        if role in entry.tensors:
            raise WeightsError(f"LoRA key {key!r} repeats the {role} of {module_id!r} given by {entry.keys}")
        entry.tensors[role] = tensor
        entry.keys.append(key)
    return grouped, unknown


def _module_lookup(model: nn.Module) -> dict[str, nn.Module]:
    """Layer by dotted and underscored name, with ``text_model.`` aliases for text encoders (with and without
    it: transformers 5 writes peft keys of ``CLIPTextModel`` without it), and a UNet's original SGM
    names (``input_blocks_4_1_...``, which kohya's SDXL LoRAs use)."""
    lookup: dict[str, nn.Module] = {}
    alias_text_model = not hasattr(model, "text_model") and hasattr(model, "encoder") and hasattr(model, "embeddings")
    original_names = _original_unet_names(model)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        names = [name, f"text_model.{name}"] if alias_text_model else [name]
        names += [name.removeprefix("text_model.")] if name.startswith("text_model.") else []
        names = [n.removesuffix(".base_layer") for n in names]  # a layer inside a peft wrapper
        if original_names:
            original = single_file_layout.to_original(f"{names[0]}.weight", original_names)
            names += [original.removesuffix(".weight")] if original else []
        for alias in names:
            lookup[alias] = module
            lookup["_" + alias.replace(".", "_")] = module
    return lookup


def _original_unet_names(model: nn.Module) -> dict[str, str]:
    """``{our module path: original module path}`` for a UNet2DConditionModel-like config, else empty."""
    config = getattr(model, "config", None)
    if not (isinstance(config, Mapping) and "down_block_types" in config and "up_block_types" in config
            and isinstance(config.get("layers_per_block"), int)):
        return {}
    return single_file_layout.unet_name_map(config)


def _pattern_value(patterns: dict, name: str):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            return value
    return None


def _alphas(component: str, entries: dict[str, _Entry], metadata: dict, source: str) -> dict[str, float]:
    """alpha per module id: from ``.alpha`` keys, else metadata, else the most common alpha, else rank."""
    given = {m: float(e.tensors["alpha"]) for m, e in entries.items() if "alpha" in e.tensors}
    common = collections.Counter(given.values()).most_common(1)[0][0] if given else None
    meta_alpha = metadata.get(f"{component}.lora_alpha")
    alpha_pattern = metadata.get(f"{component}.alpha_pattern") or {}
    result = {}
    for module_id, entry in entries.items():
        if module_id in given:
            result[module_id] = given[module_id]
        elif _pattern_value(alpha_pattern, module_id) is not None:
            result[module_id] = _finite_alpha(_pattern_value(alpha_pattern, module_id), f"{component}.alpha_pattern",
                                              source)
        elif meta_alpha is not None:
            result[module_id] = _finite_alpha(meta_alpha, f"{component}.lora_alpha", source)
        elif common is not None:
            result[module_id] = common
        elif "down" in entry.tensors:
            result[module_id] = float(entry.tensors["down"].shape[0])
    return result


def plan_adapters(grouped: dict, models: dict[str, nn.Module], metadata: dict, source: str):
    """``({component: [(module, Adapter)]}, unmatched keys)``; shape errors raise ValueError naming the keys."""
    plan: dict[str, list[tuple[nn.Module, layers.Adapter]]] = {}
    unmatched: list[str] = []
    for component, entries in grouped.items():
        model = models.get(component)
        if model is None:
            unmatched += [k for e in entries.values() for k in e.keys]
            continue
        lookup = _module_lookup(model)
        alphas = _alphas(component, entries, metadata, source)
        targets = []
        for module_id, entry in entries.items():
            module = lookup.get(module_id)
            if module is None or "down" not in entry.tensors or "up" not in entry.tensors:
                unmatched += entry.keys
                continue
            where = f"{source}: {entry.keys[0]}"
            down, up = layers.check_adapter_shapes(module, entry.tensors["down"], entry.tensors["up"], where)
            rank = down.shape[0]
            targets.append((module, layers.Adapter(down, up, alphas[module_id] / rank, entry.tensors.get("up_bias"))))
        if targets:
            plan[component] = targets
    return plan, unmatched


def _clip(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_adapter_name(name: str, existing: list[str]) -> None:
    """ValueError when ``name`` is taken, empty or dotted."""
    if name in existing:
        raise ValueError(f"adapter name {name!r} is already in use; pick another or delete_adapters it")
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and contain no '.', got {name!r}")


def load_state(models: dict[str, nn.Module], state: dict, metadata: dict, source: str, adapter_name: str,
               strict: bool, owner: str, replace: bool = False) -> None:
    """Add the LoRA ``state`` to ``models`` (component -> model) as ``adapter_name``, the only active adapter
    of the models it reaches from then on (``replace``: in place of the adapter of that name, once the new one
    is checked). Keys that reach no layer raise WeightsError listing them (``strict=False``: a warning)."""
    check_lora_values(state, source)
    file_keys, origin = sorted(state), {}
    transformer = models.get("transformer", models.get("model"))
    norms, widened = {}, []
    if is_flux_transformer(transformer):
        state, origin = convert_flux_lora(state, transformer, source)
        state, norms, widened = lora_flux.prepare_control_lora(transformer, state, source, adapter_name)
    with lora_flux.undo_widening_on_error(transformer, widened):
        grouped, unknown = group_lora_keys(state, list(models))
        plan, unmatched = plan_adapters(grouped, models, metadata, source)
        unmatched = list(dict.fromkeys(origin.get(k, k) for k in unknown + unmatched))
        if not plan and not norms:
            raise WeightsError(f"{source}: no key of this LoRA reaches a layer of {owner} "
                               f"({len(file_keys)} keys: {_clip(file_keys)})")
        if unmatched:
            message = f"{source}: LoRA keys that match no layer: {_clip(sorted(unmatched))}"
            if strict:
                raise WeightsError(message + " (pass strict=False to load the rest)")
            logger.warning("%s; loading the rest", message)
        for component, targets in plan.items():
            lora_hotswap.check_targets(models[component], targets, source)
    if replace:
        for model in models.values():
            adapters.delete(model, [adapter_name])
    if norms:
        lora_flux.replace_norms(transformer, norms)
    for component, targets in plan.items():
        for module, adapter in targets:
            layers.add_adapter(module, adapter_name, adapter)
        layers.install_scale_hook(models[component])
    for component in plan:  # in each model it reached, the new adapter alone is active (layers of both kinds)
        adapters.activate(models[component], [adapter_name])


def load_into_model(model: nn.Module, state: dict, metadata: dict, source: str, adapter_name: str,
                    strict: bool) -> None:
    """``model.load_lora_adapter``: ``state`` keys name ``model``'s own modules; ``metadata`` is unprefixed."""
    check_adapter_name(adapter_name, adapters.adapter_names(model))
    prefixed = {f"model.{k}": v for k, v in metadata.items()}
    load_state({"model": model}, state, prefixed, source, adapter_name, strict, type(model).__name__)


def _component_weight(weight: Any, component: str, name: str, model: nn.Module) -> adapters.Weight:
    """The weight of adapter ``name`` for ``component``: a number, or (UNet) weights by block."""
    if isinstance(weight, dict):
        weight = weight.get(component, 1.0)
    if isinstance(weight, dict):
        if component != "unet":
            raise ValueError(f"adapter weight for {name!r}: weights by block are for the unet, not {component}")
        return adapters.block_weights(model, weight)
    return 1.0 if weight is None else float(weight)


class LoraLoaderMixin:
    """LoRA adapters on a pipeline's ``unet`` / ``transformer`` and text encoders.

    The mixin needs only the component attributes; it keeps its bookkeeping on the models' layers
    (diffusekit's own LoRA layers and peft's, see :mod:`~diffusekit.loaders.peft_adapters`).
    """

    #: The components LoRA files and adapters can reach (the reference's name, read by its tests).
    _lora_loadable_modules = list(LORA_COMPONENTS)
    #: Component names, as the reference's pipelines name them (prefixes in LoRA files).
    unet_name, transformer_name = "unet", "transformer"
    text_encoder_name = "text_encoder"

    def _lora_models(self, components: list[str] | None = None) -> dict[str, nn.Module]:
        models = {name: model for name in LORA_COMPONENTS
                  if isinstance(model := getattr(self, name, None), nn.Module)}
        return models if components is None else {n: m for n, m in models.items() if n in components}

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Adapters loaded per component: ``{"unet": ["a", "b"], "text_encoder": ["a"]}``."""
        found = {name: adapters.adapter_names(model) for name, model in self._lora_models().items()}
        return {name: names for name, names in found.items() if names}

    def _all_adapters(self) -> list[str]:
        return list(dict.fromkeys(n for names in self.get_list_adapters().values() for n in names))

    def get_active_adapters(self) -> list[str]:
        """Names of the adapters in use."""
        return list(dict.fromkeys(n for model in self._lora_models().values()
                                  for n in adapters.active_adapters(model)))

    @property
    def fused_loras(self) -> set[str]:
        """Names of the adapters fused into the weights (``fuse_lora``) and not unfused."""
        return set().union(*(adapters.fused_adapters(m) for m in self._lora_models().values()))

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                          adapter_name: str | None = None, weight_name: str | None = None, strict: bool = True,
                          **kwargs: Any) -> None:
        """Load a LoRA (diffusers/peft, kohya, FLUX BFL layouts; a file, a folder, a Hub repo or a state dict)
        as adapter ``adapter_name`` (default ``default_<n>``), which becomes the only active adapter of each
        model it reaches (layers of both kinds).

        Keys that reach no layer raise WeightsError listing them (``strict=False``: a warning).
        """
        hub = split_hub_kwargs(kwargs)
        kwargs.pop("low_cpu_mem_usage", None)
        hotswap = kwargs.pop("hotswap", False)
        if kwargs:
            raise TypeError(f"load_lora_weights got unexpected arguments {sorted(kwargs)}")
        existing = self._all_adapters()
        adapter_name = adapter_name or f"default_{len(existing)}"
        if not hotswap:
            check_adapter_name(adapter_name, existing)
        elif adapter_name not in existing:
            raise ValueError(f"hotswap=True replaces a loaded adapter, but there is no adapter {adapter_name!r} "
                             f"(loaded: {existing}); pass the name of one or hotswap=False")
        state, metadata, source = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name, **hub)
        load_state(self._lora_models(), state, metadata, source, adapter_name, strict, type(self).__name__,
                   replace=hotswap)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error",
                            target_modules: list[str] | str | None = None) -> None:
        """Prepare the denoiser so that loading, swapping (``load_lora_weights(..., hotswap=True)``) and
        unloading adapters of rank up to ``target_rank`` never recompiles it; call before ``compile()``
        (``check_compiled``: "error", "warn" or "ignore" when it is compiled or has adapters already).
        See :mod:`~diffusekit.loaders.lora_hotswap`."""
        denoiser = next((m for n, m in self._lora_models().items() if n in ("unet", "transformer")), None)
        if denoiser is None:
            raise ValueError(f"enable_lora_hotswap: {type(self).__name__} has no unet or transformer")
        lora_hotswap.enable_lora_hotswap(denoiser, target_rank, check_compiled, target_modules)

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                        weight_name: str | None = None, return_lora_metadata: bool = False, **kwargs: Any):
        """The LoRA file's tensors as stored (and its adapter metadata with ``return_lora_metadata=True``)."""
        hub = split_hub_kwargs(kwargs)
        state, metadata, _ = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name, **hub)
        return (state, metadata or None) if return_lora_metadata else state

    @classmethod
    def save_lora_weights(cls, save_directory: str | os.PathLike, weight_name: str | None = None,
                          safe_serialization: bool = True, is_main_process: bool = True, **kwargs: Any) -> None:
        """Write ``<component>_lora_layers`` state dicts (and ``<component>_lora_adapter_metadata``) as one
        LoRA file, keys prefixed ``<component>.``, as the reference does."""
        state: dict[str, torch.Tensor] = {}
        metadata: dict[str, Any] = {}
        for component in LORA_COMPONENTS:
            for key, value in (kwargs.pop(f"{component}_lora_layers", None) or {}).items():
                state[f"{component}.{key}"] = value
            for key, value in (kwargs.pop(f"{component}_lora_adapter_metadata", None) or {}).items():
                metadata[f"{component}.{key}"] = value
        kwargs.pop("save_function", None)
        if kwargs:
            raise TypeError(f"save_lora_weights got unexpected arguments {sorted(kwargs)}")
        if not state:
            raise ValueError("save_lora_weights needs at least one of " +
                             ", ".join(f"{c}_lora_layers" for c in LORA_COMPONENTS))
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if is_main_process:
            adapters.write_lora_file(state, metadata, Path(save_directory), weight_name, safe_serialization)

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list | dict | None = None) -> None:
        """Use only ``adapter_names``, each times its weight (a float, or ``{"unet": w, "text_encoder": w}``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self._all_adapters()
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: {loaded}.")
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter weights")
        weights = [self._known_component_weights(w) if isinstance(w, dict) else w for w in weights]
        for component, model in self._lora_models().items():
            adapters.activate(model, names, [_component_weight(w, component, n, model) for n, w in zip(names, weights)])

    def _known_component_weights(self, weights: dict) -> dict:
        """``weights`` by component without the components that take no LoRA here (a warning names them)."""
        unknown = sorted(set(weights) - set(self._lora_loadable_modules))
        if unknown:
            logger.warning("The following components in `adapter_weights` are not part of the pipeline: %s. "
                           "Available components that are LoRA-compatible: %s. Their weights are ignored.",
                           unknown, self._lora_loadable_modules)
        return {k: v for k, v in weights.items() if k not in unknown}

    def set_lora_device(self, adapter_names: list[str], device: torch.device | str | int) -> None:
        """Move the named adapters' tensors to ``device`` (the base weights stay where they are)."""
        for model in self._lora_models().values():
            adapters.move_adapters(model, adapter_names, device)

    def disable_lora(self) -> None:
        for model in self._lora_models().values():
            adapters.set_enabled(model, False)

    def enable_lora(self) -> None:
        for model in self._lora_models().values():
            adapters.set_enabled(model, True)

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """Remove adapters (their fused contribution, if any, stays in the weights until ``unfuse_lora``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for model in self._lora_models().values():
            adapters.delete(model, names)

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Remove every adapter and the LoRA layers. Unfused, the original weights come back exactly;
        fused adapters stay baked into the weights (``fuse_lora(); unload_lora_weights()``), as in the reference.
        Norm weights a FLUX control LoRA replaced come back too, and with ``reset_to_overwritten_params``
        the layers it widened (see :mod:`~diffusekit.loaders.lora_flux`)."""
        for model in self._lora_models().values():
            adapters.unload(model)
            lora_flux.unload_control_lora(model, reset_to_overwritten_params)

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs: Any) -> None:
        """Add the active adapters (or ``adapter_names``) times ``lora_scale`` into the weights of
        ``components`` (default: all LoRA components)."""
        models = self._lora_models(components)
        if components is not None and (unknown := set(components) - set(self._lora_loadable_modules)):
            raise ValueError(f"fuse_lora: {sorted(unknown)} are not LoRA components of {type(self).__name__} "
                             f"(have {self._lora_loadable_modules})")
        for model in models.values():
            adapters.fuse(model, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs: Any) -> None:
        """Put back the weights from before ``fuse_lora`` exactly."""
        for model in self._lora_models(components).values():
            adapters.unfuse(model)

    def lora_text_encoder_scale(self, scale: float | None):
        """Context manager scaling the text encoders' adapters (``cross_attention_kwargs["scale"]``)."""
        stack = contextlib.ExitStack()
        for name in ("text_encoder", "text_encoder_2"):
            model = getattr(self, name, None)
            stack.enter_context(layers.lora_call_scale(model, scale))
            stack.enter_context(layers.scaled_peft_layers(model, scale))
        return stack


__all__ = ["LoraLoaderMixin", "read_lora_file", "group_lora_keys", "plan_adapters"]
