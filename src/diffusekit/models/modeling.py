"""ModelMixin: saving and loading ``torch.nn.Module`` models in the diffusers folder layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configuration import ConfigMixin, config_attribute, read_json
from ..hub import resolve_folder
from ..loaders.peft_adapters import PeftAdapterMixin
from ..weights import SAFETENSORS_NAME, WeightsError, find_weights, load_weights, save_weights
from .layers import building_for_load


class ModelMixin(PeftAdapterMixin, nn.Module, ConfigMixin):
    """Adds ``from_pretrained`` / ``save_pretrained`` to a model whose ``__init__`` is config-registered.

    Loading builds the module on the meta device and assigns the tensors read from the file, so
    no time is spent on random initialisation. Loading is strict: missing or unexpected keys and
    shape mismatches raise :class:`~diffusekit.weights.WeightsError` listing them.
    """

    config_name = "config.json"
    config_example_name = "unet"
    #: Whether ``enable_gradient_checkpointing`` applies (some blocks carry ``gradient_checkpointing``).
    _supports_gradient_checkpointing = False
    #: Renames applied to checkpoint keys from older releases before strict checking.
    legacy_key_renames: tuple[tuple[str, str], ...] = ()
    #: Modules ``from_pretrained(torch_dtype=...)`` keeps in float32 (the reference's name): none here.
    _keep_in_fp32_modules: list[str] | None = None
    #: Extra module-path patterns ``enable_layerwise_casting`` leaves in their dtype.
    _skip_layerwise_casting_patterns: tuple[str, ...] | None = None

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return config_attribute(self, name)

    # -- gradient checkpointing -----------------------------------------------------------------

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any block recomputes its activations in the backward pass."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """Recompute the activations of the blocks the reference checkpoints during backward (saves memory
        when training). ``gradient_checkpointing_func(module, *args)`` replaces ``torch.utils.checkpoint``."""
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        self._set_gradient_checkpointing(True, gradient_checkpointing_func or checkpoint_module)

    def disable_gradient_checkpointing(self) -> None:
        if self._supports_gradient_checkpointing:
            self._set_gradient_checkpointing(False, checkpoint_module)

    def _set_gradient_checkpointing(self, enable: bool, func: Callable) -> None:
        blocks = [m for m in self.modules() if hasattr(m, "gradient_checkpointing")]
        if not blocks:
            raise ValueError(f"{type(self).__name__} has no block that supports gradient checkpointing")
        for block in blocks:
            block.gradient_checkpointing = enable
            block._gradient_checkpointing_func = func

    # -- layerwise casting ---------------------------------------------------------------------

    def enable_layerwise_casting(self, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                                 compute_dtype: torch.dtype | None = None,
                                 skip_modules_pattern: tuple[str, ...] | None = None,
                                 skip_modules_classes: tuple[type, ...] | None = None,
                                 non_blocking: bool = False) -> None:
        """Keep the Linear/conv weights in ``storage_dtype`` and compute each layer in ``compute_dtype``
        (default: the model's dtype); see :mod:`~diffusekit.models.layerwise_casting`. ``non_blocking`` is
        accepted for the reference's signature (the casts here are per call, on the layer's device)."""
        from .layerwise_casting import enable_layerwise_casting

        enable_layerwise_casting(self, storage_dtype, compute_dtype or self.dtype, skip_modules_pattern,
                                 skip_modules_classes)

    # -- saving ---------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
    ) -> None:
        """Write ``config.json`` and the weights (``diffusion_pytorch_model[.variant].safetensors``)."""
        folder = Path(save_directory)
        self.save_config(folder)
        save_weights(self.state_dict(), folder, variant=variant, safe_serialization=safe_serialization,
                     max_shard_size=max_shard_size)

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        copy_weights: bool | None = None,
        **kwargs: Any,
    ):
        """Load a model from a folder or Hub repo holding ``config.json`` and its weights.

        Weights are memory-mapped: truncating or rewriting the file while the model is in use
        crashes the process (SIGBUS). ``copy_weights=True`` (default: the environment variable
        ``DIFFUSEKIT_COPY_WEIGHTS=1``) reads them into private memory instead.
        """
        kwargs.pop("low_cpu_mem_usage", None)  # always on here
        token = kwargs.pop("token", None)
        patterns = ["*.json", f"*.{variant}.*" if variant else "diffusion_pytorch_model*"]
        folder = resolve_folder(
            pretrained_model_name_or_path, subfolder=subfolder, allow_patterns=patterns,
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        )
        config_path = folder / cls.config_name
        config = read_json(config_path)
        cls._check_class_name(config, config_path)
        config.update(kwargs)
        weights_path = find_weights(folder, variant=variant, use_safetensors=use_safetensors)
        state = load_weights(weights_path, copy=copy_weights)
        with skip_init(device="meta"):
            model = cls.from_config(config)
        model.load_checked_state_dict(state, source=weights_path, dtype=torch_dtype)
        return model.eval()

    @classmethod
    def _check_class_name(cls, config: dict, path: Path) -> None:
        """A config written for another model class is refused (a missing ``_class_name`` is fine)."""
        name = config.get("_class_name")
        if name is not None and name != cls.__name__:
            raise ValueError(f"{path} is the config of {name!r}, not of {cls.__name__!r}; load it with {name}")

    def load_checked_state_dict(
        self, state: dict[str, torch.Tensor], source: Any = "state dict", dtype: torch.dtype | None = None
    ) -> None:
        """Assign ``state`` to this module after checking keys and shapes; errors name ``source``."""
        state = self.rename_legacy_keys(state)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shapes = [
            f"shape mismatch for key {k} in {source}: expected {tuple(v.shape)}, got {tuple(state[k].shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        wrong_kinds = [
            f"dtype mismatch for key {k} in {source}: expected {v.dtype}, got {state[k].dtype}"
            for k, v in expected.items()
            if k in state and state[k].is_floating_point() != v.is_floating_point()
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {_clip(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_clip(unexpected)}")
        problems += wrong_shapes[:20] + wrong_kinds[:20]
        if problems:
            raise WeightsError(f"{source} does not fit {type(self).__name__}: " + "; ".join(problems))
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}
        modules = dict(self.named_modules(remove_duplicate=False))
        assign_tensors(self, state, modules)
        leftover = [
            f"{prefix}.{name}" if prefix else name
            for prefix, module in modules.items()
            for tensors in (module._parameters, module._buffers)
            for name, tensor in tensors.items()
            if tensor is not None and tensor.is_meta
        ]
        if leftover:
            raise WeightsError(f"{source}: tensors not materialised after loading: {_clip(leftover)}")

    @classmethod
    def rename_legacy_keys(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply ``legacy_key_renames`` (substring renames) to checkpoint keys from older releases."""
        if not cls.legacy_key_renames:
            return state
        renamed = {}
        for key, value in state.items():
            for old, new in cls.legacy_key_renames:
                key = key.replace(old, new)
            renamed[key] = value
        return renamed


def checkpoint_module(module: Callable, *args: Any) -> Any:
    """``module(*args)`` with its activations recomputed in the backward pass (non-reentrant checkpoint)."""
    return checkpoint(module, *args, use_reentrant=False)


def maybe_checkpoint(owner: nn.Module, module: Callable, *args: Any) -> Any:
    """``module(*args)``, checkpointed when ``owner.gradient_checkpointing`` is set and gradients are on."""
    if getattr(owner, "gradient_checkpointing", False) and torch.is_grad_enabled():
        func = owner.__dict__.get("_gradient_checkpointing_func") or checkpoint_module
        return func(module, *args)
    return module(*args)


def assign_tensors(model: nn.Module, state: dict[str, torch.Tensor],
                   modules: dict[str, nn.Module] | None = None) -> None:
    """What ``load_state_dict(state, assign=True)`` does once keys and shapes are checked, without
    its per-module hook machinery: parameters wrap the given tensors (keeping ``requires_grad``),
    buffers take them as they are. ``modules``: ``dict(model.named_modules(remove_duplicate=False))``
    where the caller has it."""
    if modules is None:
        modules = dict(model.named_modules(remove_duplicate=False))
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules[owner_name]
        if leaf not in owner._parameters:
            owner._buffers[leaf] = tensor
            continue
        current = owner._parameters[leaf]
        if isinstance(tensor, nn.Parameter):
            owner._parameters[leaf] = tensor.requires_grad_(current.requires_grad)
        else:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=current.requires_grad)


def skip_init(device: str | torch.device | None = None):
    """Make building a model whose weights are about to be assigned cheap: in this thread (and task)
    only, the layers of :mod:`diffusekit.models.layers` skip ``reset_parameters`` and make their
    tensors on ``device`` (e.g. ``"meta"``) unless given one. A context variable read by those layers,
    not a patch of torch: other threads building modules meanwhile are unaffected. Plain torch layers
    in a user's own model still initialise (correct, only slower)."""
    return building_for_load(device)


def _clip(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


__all__ = ["ModelMixin", "SAFETENSORS_NAME", "maybe_checkpoint"]
