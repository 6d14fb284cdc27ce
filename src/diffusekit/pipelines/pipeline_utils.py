"""DiffusionPipeline: a bundle of components (models, scheduler, tokenizers) saved as one folder.

The folder holds ``model_index.json``, naming the pipeline class and each component as
``[library, class]``, and one subfolder per component. "transformers" components are loaded with
transformers; the other known library names ("diffusers", "diffusekit", or the reference's module
names such as "stable_diffusion" or "deprecated") mean the diffusekit class of that name.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..configuration import ConfigMixin, read_json
from ..hub import resolve_file, resolve_folder, split_hub_kwargs
from ..utils import BaseOutput
from .image_processing import numpy_to_pil
from .loading_options import check_device_map, check_variant, component_dtype, place_components, requested_dtype

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
#: Files a component folder may need besides weights (configs, tokenizer vocabularies).
_SMALL_FILES = ("*.json", "*.txt", "*.model")
#: Library names a model_index.json entry may give for a diffusekit class: ours, the reference's,
#: and the reference modules that it records for the components it keeps there (the safety
#: checker, LDMBert, the Karras VE scheduler). "transformers" names a transformers class.
_LIBRARIES = ("diffusers", "diffusekit", "stable_diffusion", "latent_diffusion", "deprecated")


@dataclass
class ImagePipelineOutput(BaseOutput):
    """Images as a list of PIL images, a numpy array (N, H, W, C) or a tensor (N, C, H, W)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


@dataclass
class AudioPipelineOutput(BaseOutput):
    """Audio as a numpy array (N, channels, samples)."""

    audios: np.ndarray


def _library_of(component: Any) -> list[str | None]:
    """The ``[library, class]`` entry that model_index.json records for a component."""
    if component is None:
        return [None, None]
    module = type(component).__module__.split(".")[0]
    if module == "diffusekit":  # a class may name the reference module it lives in (LDMBertModel)
        return [getattr(type(component), "model_index_library", "diffusers"), type(component).__name__]
    return [module, type(component).__name__]


def _diffusekit_class(name: str, where: str) -> type:
    """The class that diffusekit exports under ``name`` (nothing else it happens to hold)."""
    import diffusekit

    if name not in diffusekit.__all__:
        raise ValueError(f"{where}: unknown class {name!r} (diffusekit has no class of that name)")
    return getattr(diffusekit, name)


class DiffusionPipeline(ConfigMixin):
    """Base class of all pipelines: component registry, loading, saving, device moves, progress bars."""

    config_name = MODEL_INDEX
    #: Components that may be absent (saved as ``[null, null]``).
    _optional_components: tuple[str, ...] = ()
    #: Images in [0, 1], (N, H, W, C) or (H, W, C), as PIL images (the reference's static method).
    numpy_to_pil = staticmethod(numpy_to_pil)
    #: For pipelines of ours that the reference lacks: the reference class named in model_index.json
    #: (ours is kept under ``_diffusekit_class_name``), so the reference can still load the folder.
    _reference_class_name: str | None = None

    def __init__(self) -> None:
        self._component_names: list[str] = []
        self._progress_bar_config: dict[str, Any] = {}

    def register_modules(self, **components: Any) -> None:
        """Attach components as attributes and record them in the config as ``[library, class]``."""
        if not hasattr(self, "_component_names"):
            DiffusionPipeline.__init__(self)
        for name, component in components.items():
            setattr(self, name, component)
            if name not in self._component_names:
                self._component_names.append(name)
            self.register_to_config(**{name: _library_of(component)})

    @property
    def components(self) -> dict[str, Any]:
        """The components by name, ready to build another pipeline: ``Other(**pipe.components)``."""
        return {name: getattr(self, name) for name in self._component_names}

    @classmethod
    def from_pipe(cls, pipeline: "DiffusionPipeline", **kwargs: Any) -> "DiffusionPipeline":
        """A ``cls`` pipeline on the components of ``pipeline`` that ``cls`` takes (shared, not copied);
        keyword arguments add or replace components and options (``torch_dtype`` moves the result)."""
        torch_dtype = kwargs.pop("torch_dtype", None)
        params = inspect.signature(cls.__init__).parameters
        takes = {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if unknown := sorted(set(kwargs) - takes):
            raise ValueError(f"from_pipe: {cls.__name__} takes no {unknown} (it takes {sorted(takes)})")
        pipe = cls(**{**{n: c for n, c in pipeline.components.items() if n in takes}, **kwargs})
        return pipe if torch_dtype is None else pipe.to(torch_dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        for module in self._modules():
            for tensor in module.parameters():
                return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for module in self._modules():
            for tensor in module.parameters():
                if tensor.is_floating_point():
                    return tensor.dtype
        return torch.float32

    def to(self, *args: Any, **kwargs: Any) -> "DiffusionPipeline":
        """Move every model component to a device and/or dtype (as ``nn.Module.to`` takes them)."""
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    # -- attention ----------------------------------------------------------------------------

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Compute attention in slices: ``"auto"`` halves the heads' input, ``"max"`` one slice at a
        time, an int is the slice size. Applies to every model with ``set_attention_slice``."""
        for component in self.components.values():
            if isinstance(component, torch.nn.Module) and hasattr(component, "set_attention_slice"):
                component.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        """Compute attention in one step again."""
        self.enable_attention_slicing(None)

    # -- compilation --------------------------------------------------------------------------

    def compile(self, *, mode: str | None = None, regional: bool = True, backend: Any = "inductor",
                fullgraph: bool = True, dynamic: bool | None = None, options: dict | None = None,
                channels_last: bool = False, fuse_qkv: bool = False, whole_step: bool = False) -> torch.nn.Module:
        """torch.compile the denoiser (``unet`` or ``transformer``) in place and return it.

        ``regional=True`` compiles each repeated block (transformer blocks) once per shape, a fraction
        of the full compile time; ``regional=False`` compiles the whole forward as one graph.
        ``whole_step=True`` instead compiles each denoising step (scheduler input scaling, denoiser,
        guidance, scheduler update) as one graph, the denoiser itself staying eager
        (:mod:`diffusekit.pipelines.whole_step`; ``regional`` does not apply).
        ``mode`` (e.g. ``"reduce-overhead"`` for CUDA graphs, ``"max-autotune"``), ``backend``,
        ``fullgraph``, ``dynamic`` and ``options`` go to ``torch.compile``. ``channels_last`` and
        ``fuse_qkv`` (undo with ``unfuse_qkv_projections()``) are opt-in; see
        :mod:`diffusekit.pipelines.compile` for what recompiles and the LoRA rules.
        """
        from . import whole_step as steps
        from .compile import compile_denoiser, find_denoiser, prepare_denoiser

        settings = dict(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic, options=options)
        denoiser = find_denoiser(self)
        if whole_step:
            steps.check_whole_step(self, settings)
        steps.drop_whole_step(self)
        if not whole_step:
            return compile_denoiser(denoiser, regional=regional, channels_last=channels_last, fuse_qkv=fuse_qkv,
                                    **settings)
        prepare_denoiser(denoiser, channels_last=channels_last, fuse_qkv=fuse_qkv)
        steps.compile_whole_step(self, settings)
        return denoiser

    # -- progress -----------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar, e.g. ``disable=True`` or ``desc="sampling"``."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total: int | None = None):
        from tqdm.auto import tqdm

        config = getattr(self, "_progress_bar_config", {})
        if iterable is not None:
            return tqdm(iterable, **config)
        return tqdm(total=total, **config)

    def step_callback(self, state, step: int, t, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Call the call ``state``'s ``callback(pipe, step, t, {name: tensor})`` (``callback_on_step_end``)
        with the ``callback_names`` it asked for; returns ``tensors`` updated with what it returned."""
        if state.callback is None:
            return tensors
        returned = state.callback(self, step, t, {name: tensors[name] for name in state.callback_names}) or {}
        return {**tensors, **{k: v for k, v in returned.items() if k in tensors}}

    # -- saving ---------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, **kwargs: Any) -> None:
        """Write model_index.json and every component into its own subfolder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, component in self.components.items():
            if component is None:
                continue
            target = folder / name
            save = component.save_pretrained
            params = inspect.signature(save).parameters
            options = {}
            if "safe_serialization" in params:
                options["safe_serialization"] = safe_serialization
            if "variant" in params and variant is not None:
                options["variant"] = variant
            save(target, **options)
        self.save_config(folder)  # written atomically, after the components

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a pipeline from a folder or Hub repo with model_index.json.

        Keyword arguments: ``dtype`` (or ``torch_dtype``; one dtype, or a dict by component name with
        ``"default"`` for the rest), ``variant``, ``use_safetensors``, ``device_map`` (a device, a dict
        of devices by component, or ``"balanced"`` over the accelerators), the Hub options
        (``revision``, ``cache_dir``, ``local_files_only``, ``token``), components by name to use
        instead of the saved ones (``scheduler=...``, ``safety_checker=None``), and pipeline
        options such as ``requires_safety_checker``. ``low_cpu_mem_usage`` is accepted: loading
        never initialises weights it then overwrites.
        """
        hub = split_hub_kwargs(kwargs)
        dtype = requested_dtype(kwargs)
        options = {key: kwargs.pop(key, None) for key in ("variant", "use_safetensors", "copy_weights")}
        device_map = kwargs.pop("device_map", None)
        check_device_map(device_map)
        kwargs.pop("low_cpu_mem_usage", None)

        index_path = resolve_file(pretrained_model_name_or_path, MODEL_INDEX, **hub)
        index = read_json(index_path)
        pipeline_cls = cls._pipeline_class(index, index_path)
        folder = cls._fetch_folder(pretrained_model_name_or_path, index, options["use_safetensors"], hub)
        if options["variant"] is not None:
            saved = [k for k, v in index.items() if k not in kwargs and isinstance(v, list) and len(v) == 2
                     and _needs_weights(v)]
            check_variant(folder, saved, options["variant"])

        params = inspect.signature(pipeline_cls.__init__).parameters
        arguments: dict[str, Any] = {}
        for name, param in params.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            is_component = param.default is inspect.Parameter.empty or name in pipeline_cls._optional_components
            if name in kwargs:
                arguments[name] = kwargs.pop(name)
            elif name in index and (is_component or isinstance(index[name], list)):
                arguments[name] = _load_component(name, index[name], folder, index_path,
                                                  torch_dtype=component_dtype(dtype, name), **options)
                if arguments[name] is not None:
                    logger.info("Loaded %s as %s from `%s` subfolder of %s.", name, type(arguments[name]).__name__,
                                name, pretrained_model_name_or_path)
            elif name in index:
                arguments[name] = index[name]
            elif param.default is inspect.Parameter.empty and name not in pipeline_cls._optional_components:
                raise ValueError(f"{index_path} has no entry for component {name!r} of {pipeline_cls.__name__}")
            elif name in pipeline_cls._optional_components:
                arguments[name] = None
        if kwargs:
            raise TypeError(f"{pipeline_cls.__name__}.from_pretrained got unexpected arguments {sorted(kwargs)}")
        pipeline = pipeline_cls(**arguments)
        if device_map is not None:
            pipeline.hf_device_map = place_components(pipeline.components, device_map)
        return pipeline

    @classmethod
    def _pipeline_class(cls, index: dict, index_path: Path) -> type:
        if cls is not DiffusionPipeline:
            return cls
        name = index.get("_diffusekit_class_name") or index.get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{index_path} does not name a pipeline class (_class_name)")
        pipeline_cls = _diffusekit_class(name, str(index_path))
        if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, DiffusionPipeline)):
            raise ValueError(f"{index_path}: {name!r} is not a pipeline class")
        return pipeline_cls

    @staticmethod
    def _fetch_folder(name_or_path, index: dict, use_safetensors: bool | None, hub: dict) -> Path:
        """The local folder: in place, or the Hub files that the listed components need."""
        if Path(name_or_path).is_dir():
            return Path(name_or_path)
        parts = [k for k, v in index.items() if isinstance(v, list) and v[0] is not None]
        weights = ("*.safetensors", "*.safetensors.index*.json") if use_safetensors is not False else ("*.bin",)
        patterns = [MODEL_INDEX] + [f"{p}/{g}" for p in parts for g in (*_SMALL_FILES, *weights)]
        folder = resolve_folder(name_or_path, allow_patterns=patterns, **hub)
        if use_safetensors is None:  # fall back to legacy pickles for components without safetensors
            legacy = [p for p in parts
                      if _needs_weights(index[p]) and not any((folder / p).glob("*.safetensors*"))]
            if legacy:
                folder = resolve_folder(name_or_path, allow_patterns=patterns + [f"{p}/*.bin" for p in legacy], **hub)
        return folder

    def to_json_string(self) -> str:
        """model_index.json; a pipeline the reference lacks is saved under a reference class it can load."""
        text = super().to_json_string()
        if self._reference_class_name is None:
            return text
        data = json.loads(text)
        data["_class_name"] = self._reference_class_name
        data["_diffusekit_class_name"] = type(self).__name__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _needs_weights(entry: list) -> bool:
    name = entry[1] or ""
    return not (name.endswith("Scheduler") or "Tokenizer" in name or "Processor" in name or "Extractor" in name)


def _component_class(name: str, entry: Any, index_path: Path) -> type | None:
    """The class a model_index.json entry ``[library, class]`` names, None for ``[null, null]``.

    Only classes diffusekit exports (or, for "transformers", classes transformers exports) are
    returned; nothing named by the file is imported.
    """
    where = f"{index_path} (component {name!r})"
    if entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        raise ValueError(f"{where}: expected [library, class] (or [null, null] for none), found {entry!r}")
    library, class_name = entry
    if library == "transformers":
        from .transformers_loading import own_class

        if own_class(class_name) is not None:
            return own_class(class_name)
        import transformers

        component_cls = getattr(transformers, class_name, None) if class_name in transformers.__all__ else None
        if not (isinstance(component_cls, type) and hasattr(component_cls, "from_pretrained")):
            raise ValueError(f"{where}: transformers has no loadable class {class_name!r}")
        return component_cls
    component_cls = _diffusekit_class(class_name, where)
    if library not in _LIBRARIES or not (isinstance(component_cls, type) and hasattr(component_cls, "from_pretrained")):
        raise ValueError(f"{where}: library {library!r} has no loadable class {class_name!r}"
                         f" (known libraries: {', '.join(_LIBRARIES)}, transformers)")
    return component_cls


def _load_component(name: str, entry: Any, folder: Path, index_path: Path, torch_dtype, variant, use_safetensors,
                    copy_weights):
    component_cls = _component_class(name, entry, index_path)
    if component_cls is None:
        return None
    path = folder / name
    if entry[0] == "transformers":
        from .transformers_loading import load_transformers_component

        return load_transformers_component(component_cls, path, torch_dtype, variant)
    from ..models.modeling import ModelMixin

    if issubclass(component_cls, ModelMixin):
        options = dict(torch_dtype=torch_dtype, use_safetensors=use_safetensors, copy_weights=copy_weights)
        try:
            return component_cls.from_pretrained(path, variant=variant, **options)
        except FileNotFoundError:
            if variant is None:
                raise
            logger.warning("%s has no %s variant; loading the default weights", path, variant)
            return component_cls.from_pretrained(path, **options)
    return component_cls.from_pretrained(path)
