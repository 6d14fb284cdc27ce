"""Single-file Stable Diffusion checkpoints (``.safetensors``, or ``.ckpt`` read with
``weights_only=True``) in the original CompVis/Stability (LDM, SGM) layout, loaded offline.

* ``StableDiffusionPipeline.from_single_file(path, config=None, tokenizer=None, prediction_type=None,
  ...)`` (and every pipeline inheriting :class:`FromSingleFileMixin`: img2img, inpainting, SDXL);
* ``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file``
  (:class:`~diffusekit.loaders.single_file_model.FromOriginalModelMixin`, which knows no model class;
  this module knows the models) and :func:`text_encoder_from_single_file`;
* :func:`convert` (pipeline folder -> single file, single file -> folder) for ``diffusekit convert``.

The family is read from the keys (:func:`~diffusekit.loaders.single_file_model.detect_family`):
SD 1.x (CLIP at ``cond_stage_model.transformer.``), SD 2.x (OpenCLIP at ``cond_stage_model.model.``),
SDXL base (CLIP-L at ``conditioner.embedders.0.transformer.``, OpenCLIP-bigG at
``conditioner.embedders.1.model.``), SDXL refiner (OpenCLIP-bigG at ``conditioner.embedders.0.model.``);
inpainting when ``conv_in`` takes 9 channels. A pipeline gets the components its ``__init__`` names:
``text_encoder`` / ``text_encoder_2`` and ``tokenizer`` / ``tokenizer_2`` as the family holds them
(:data:`~diffusekit.loaders.single_file_layout.FAMILY_TEXT_ENCODERS`; the refiner has no
``text_encoder``: None), and the pipeline options of the config's (or the shipped) model_index.json.
v-prediction cannot be read from the weights: pass ``prediction_type="v_prediction"`` (or a
``config`` whose scheduler says so). Configs come from ``config`` (a diffusers pipeline folder or
Hub repo) or, by default, from the family configs shipped in ``diffusekit/assets/configs``. The CLIP
tokenizers come from ``tokenizer=``, ``config``'s ``tokenizer/`` (``tokenizer_2/``) folder, or else
the ones shipped with diffusekit (:mod:`~diffusekit.loaders.clip_tokenizer`; SD 2.x and SDXL's
``tokenizer_2`` pad with ``!``), so nothing is downloaded. EMA weights (``model_ema.*``) are used
when present unless ``extract_ema=False``. Key mapping rules: :mod:`~diffusekit.loaders.single_file_layout`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from ..hub import resolve_folder
from ..models.autoencoder_kl import AutoencoderKL
from ..models.unet_2d_condition import UNet2DConditionModel
from ..weights import WeightsError
from . import single_file_layout as layout
from .single_file_model import (  # FromOriginalModelMixin: re-exported
    CONFIG_ROOT,
    FromOriginalModelMixin,
    clip_list,
    component_config,
    conv_in_channels,
    convert_keys,
    detect_family,
    load_model,
    read_checkpoint,
    strip_prefix,
    use_ema,
)

_IGNORED_TEXT_KEYS = ("position_ids", "text_projection", "logit_scale", "attn_mask")


def _config_folder(config, **hub) -> Path | None:
    if config is None:
        return None
    return resolve_folder(config, allow_patterns=["*.json", "*.txt"], **hub)


def text_encoder_state(state, model_keys: dict[str, torch.Tensor], source,
                       slot: layout.TextEncoderSlot) -> dict[str, torch.Tensor]:
    """Our keys of ``slot``'s text encoder (transformers CLIP names) from the checkpoint's CLIP or OpenCLIP part."""
    part = strip_prefix(state, slot.prefix)
    if not part:
        raise WeightsError(f"{source}: no {slot.component} weights ({slot.prefix}*)")
    if slot.key_layout == "openclip":
        result, missing = layout.from_openclip(model_keys, part)
        if missing:
            raise WeightsError(f"{source}: the OpenCLIP {slot.component} ({slot.prefix}*) lacks {clip_list(missing)}")
        return result
    clip = {k.removeprefix("text_model."): v for k, v in part.items() if not k.endswith(_IGNORED_TEXT_KEYS)}
    with_prefix = any(k.startswith("text_model.") for k in model_keys)
    rename = (lambda k: k.removeprefix("text_model.")) if with_prefix else (lambda k: k)
    return convert_keys(model_keys, clip, rename, source, slot.component)


def _slot(family: str, component: str) -> layout.TextEncoderSlot:
    slots = {slot.component: slot for slot in layout.FAMILY_TEXT_ENCODERS[family]}
    if component not in slots:
        raise ValueError(f"{family} checkpoints hold no {component} (they hold {sorted(slots)})")
    return slots[component]


def text_encoder_from_single_file(path_or_state, config=None, torch_dtype: torch.dtype | None = None,
                                  family: str | None = None, component: str | None = None):
    """A text encoder (``CLIPTextModel``, or ``CLIPTextModelWithProjection`` for SDXL's
    ``text_encoder_2``; diffusekit's, in transformers' layout) from a checkpoint. ``component``: "text_encoder" or "text_encoder_2" (default:
    the family's first); ``config``: a transformers config, a dict, or a folder with ``config.json``
    (default: the shipped config of the detected family)."""
    state = path_or_state if isinstance(path_or_state, dict) else read_checkpoint(path_or_state)
    source = "state dict" if isinstance(path_or_state, dict) else str(path_or_state)
    family = family or detect_family(state)
    slot = _slot(family, component or layout.FAMILY_TEXT_ENCODERS[family][0].component)
    if config is None or isinstance(config, (str, os.PathLike)):
        config = component_config(slot.component, family, Path(config) if config is not None else None)
    return _text_encoder(state, source, slot, config, torch_dtype)


def _text_encoder(state, source, slot: layout.TextEncoderSlot, config, torch_dtype: torch.dtype | None):
    """diffusekit's text encoder of ``slot`` (transformers' layout) from ``config`` (a dict, or a CLIP
    text config of ours or transformers') with the checkpoint's weights."""
    from ..models import clip_text
    from ..models.modeling import skip_init

    if hasattr(config, "to_dict"):
        config = config.to_dict()
    config = clip_text.CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    model_cls = getattr(clip_text, slot.model_class)
    with skip_init(device="meta"):
        expected = model_cls(config).state_dict()
    weights = text_encoder_state(state, expected, source, slot)
    return model_cls.from_state_dict(weights, config, source=source, dtype=torch_dtype or torch.get_default_dtype())


# -- tokenizer and scheduler ----------------------------------------------------------------------


def _tokenizer(slot: layout.TextEncoderSlot, folder: Path | None, text_encoder, source):
    """``folder/<tokenizer>`` when there is one, else the shipped CLIP tokenizer of the slot, which
    must fit the text encoder's vocabulary."""
    from transformers import CLIPTokenizer

    from .clip_tokenizer import clip_tokenizer

    if folder is not None and (folder / slot.tokenizer).is_dir():
        return CLIPTokenizer.from_pretrained(folder / slot.tokenizer)
    tokenizer = clip_tokenizer(slot.tokenizer_family)
    vocab_size = getattr(getattr(text_encoder, "config", None), "vocab_size", None)
    if vocab_size is not None and vocab_size != len(tokenizer):
        raise ValueError(f"{source}: the {slot.component} has {vocab_size} tokens, not the {len(tokenizer)} of the "
                         f"shipped CLIP tokenizer; pass {slot.tokenizer}= or config=<a pipeline folder with "
                         f"{slot.tokenizer}/>")
    return tokenizer


def _scheduler(family: str, folder: Path | None, prediction_type: str | None):
    import diffusekit

    config = component_config("scheduler", family, folder)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    scheduler_cls = getattr(diffusekit, config.get("_class_name", "PNDMScheduler"))
    return scheduler_cls.from_config(config)


def _family_overrides(family: str, prediction_type: str | None, in_channels: int | None, folder) -> dict:
    overrides: dict[str, Any] = {}
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    if folder is None and family == "sd2" and prediction_type == "v_prediction":
        overrides.update(sample_size=96, upcast_attention=True)  # the 768-v model
    return overrides


# -- public classmethods --------------------------------------------------------------------------


class FromSingleFileMixin:
    """``from_single_file`` for the Stable Diffusion pipelines."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, config: str | os.PathLike | None = None,
                         tokenizer=None, prediction_type: str | None = None, torch_dtype: torch.dtype | None = None,
                         extract_ema: bool | None = None, **kwargs: Any):
        """A pipeline from one original-layout checkpoint; see the module docstring.

        Only the components the pipeline's ``__init__`` takes are built. Components given by name
        (``scheduler=``, ``vae=``, ``safety_checker=``...) replace the loaded ones; the others a
        checkpoint does not hold (``safety_checker``, ``feature_extractor``, ``depth_estimator``...)
        are None.
        """
        from ..hub import split_hub_kwargs

        hub = split_hub_kwargs(kwargs)
        source = str(pretrained_model_link_or_path)
        state = use_ema(read_checkpoint(pretrained_model_link_or_path), extract_ema, source)
        family = detect_family(state)
        folder = _config_folder(config, **hub)
        overrides = _family_overrides(family, prediction_type, conv_in_channels(state), folder)
        wanted = _init_parameters(cls)

        def needed(name: str) -> bool:
            return name in wanted and name not in kwargs

        parts: dict[str, Any] = {}
        if needed("unet"):
            unet_config = component_config("unet", family, folder, overrides)
            parts["unet"] = load_model(UNet2DConditionModel, state, unet_config, source, torch_dtype)
        if needed("vae"):
            vae_overrides = {"sample_size": 768} if overrides.get("sample_size") == 96 else {}
            vae_config = component_config("vae", family, folder, vae_overrides)
            parts["vae"] = load_model(AutoencoderKL, state, vae_config, source, torch_dtype)
        for slot in layout.FAMILY_TEXT_ENCODERS[family]:
            if needed(slot.component):
                te_config = component_config(slot.component, family, folder)
                parts[slot.component] = _text_encoder(state, source, slot, te_config, torch_dtype)
            if slot.tokenizer == "tokenizer" and tokenizer is not None:
                parts["tokenizer"] = tokenizer
            elif needed(slot.tokenizer):
                text_encoder = parts.get(slot.component, kwargs.get(slot.component))
                parts[slot.tokenizer] = _tokenizer(slot, folder, text_encoder, source)
        if needed("scheduler"):
            parts["scheduler"] = _scheduler(family, folder, prediction_type)
        for name, parameter in wanted.items():
            if name not in parts and name not in kwargs and parameter.default is inspect.Parameter.empty:
                parts[name] = None
        if needed("requires_safety_checker"):
            kwargs["requires_safety_checker"] = kwargs.get("safety_checker") is not None
        for name, value in _pipeline_options(family, folder).items():
            if needed(name) and name not in parts:
                kwargs[name] = value
        return cls(**parts, **kwargs)


def _pipeline_options(family: str, folder: Path | None) -> dict[str, Any]:
    """The pipeline options (not components) of ``folder``'s model_index.json, else (no folder, or
    none there) of the family's shipped one (the SDXL refiner: ``requires_aesthetics_score``, ``force_zeros_for_empty_prompt``)."""
    from ..configuration import read_json

    path = folder / "model_index.json" if folder is not None else None
    if path is None or not path.is_file():
        path = CONFIG_ROOT / family / "model_index.json"
    if not path.is_file():
        return {}
    return {k: v for k, v in read_json(path).items() if not k.startswith("_") and not isinstance(v, list)}


def _init_parameters(pipeline_cls) -> dict[str, inspect.Parameter]:
    """The named parameters of ``pipeline_cls.__init__`` (without ``self``)."""
    parameters = list(inspect.signature(pipeline_cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in parameters if p.kind in kinds}


# -- the way back ---------------------------------------------------------------------------------


def pipeline_to_original(pipe, text_encoder_layout: str | None = None) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a Stable Diffusion (1.x, 2.x, XL base or refiner)
    pipeline's unet, vae and text encoder(s); the family follows the text encoders the pipeline has.

    ``text_encoder_layout`` (one text encoder only): "clip" (SD 1.x) or "openclip" (SD 2.x); by
    default OpenCLIP for text encoders with plain GELU (SD 2.x), CLIP otherwise.
    """
    state: dict[str, torch.Tensor] = {}
    unet_names = layout.unet_name_map(pipe.unet.config)
    for key, tensor in pipe.unet.state_dict().items():
        name = layout.to_original(key, unet_names)
        if name is None:
            raise ValueError(f"UNet key {key!r} has no original-layout name (unsupported block)")
        state[layout.UNET_PREFIX + name] = tensor
    vae_names = layout.vae_name_map(pipe.vae.config)
    for key, tensor in pipe.vae.state_dict().items():
        name = layout.to_original(key, vae_names)
        if name is None:
            raise ValueError(f"VAE key {key!r} has no original-layout name")
        if layout.is_vae_attention_weight(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[layout.VAE_PREFIX + name] = tensor
    for slot in layout.FAMILY_TEXT_ENCODERS[_pipeline_family(pipe, text_encoder_layout)]:
        weights = getattr(pipe, slot.component).state_dict()
        if slot.key_layout == "openclip":
            state.update({slot.prefix + k: v for k, v in layout.to_openclip(weights).items()})
            continue
        state.update({slot.prefix + "text_model." + k.removeprefix("text_model."): v for k, v in weights.items()
                      if not k.endswith("position_ids")})
    return {k: v.detach().contiguous() for k, v in state.items()}


def _pipeline_family(pipe, text_encoder_layout: str | None) -> str:
    """The single-file family whose text encoders are those of ``pipe``."""
    present = {name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    if present == {"text_encoder"}:
        if text_encoder_layout is None:
            gelu = getattr(pipe.text_encoder.config, "hidden_act", "") == "gelu"
            text_encoder_layout = "openclip" if gelu else "clip"
        if text_encoder_layout not in ("clip", "openclip"):
            raise ValueError(f"text_encoder_layout must be 'clip' or 'openclip', got {text_encoder_layout!r}")
        return "sd2" if text_encoder_layout == "openclip" else "sd1"
    for family, slots in layout.FAMILY_TEXT_ENCODERS.items():
        if {slot.component for slot in slots} == present:
            return family
    raise ValueError(f"no original single-file layout holds the text encoders {sorted(present)} of "
                     f"{type(pipe).__name__}")


#: The pipeline class a converted single file becomes, per family: (text-to-image, 9-channel UNet).
FAMILY_PIPELINES = {
    "sd1": ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
    "sd2": ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"),
    "sdxl_refiner": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
}


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, *, half: bool = False,
            config: str | os.PathLike | None = None, tokenizer=None, prediction_type: str | None = None,
            extract_ema: bool | None = None, text_encoder_layout: str | None = None) -> Path:
    """Convert between a diffusers pipeline folder and an original single-file checkpoint.

    * ``in_path`` a folder (with model_index.json) -> ``out_path`` a ``.safetensors`` (or ``.ckpt``)
      file in the original layout; ``half`` stores float16; ``text_encoder_layout`` as in
      :func:`pipeline_to_original`.
    * ``in_path`` a file -> ``out_path`` a pipeline folder of the class :data:`FAMILY_PIPELINES`
      names for the detected family (the second for 9-channel UNets); ``config``, ``tokenizer``,
      ``prediction_type``, ``extract_ema`` as in ``from_single_file``; ``half`` saves float16.

    Returns the path written.
    """
    import diffusekit

    source, target = Path(in_path), Path(out_path)
    dtype = torch.float16 if half else None
    if source.is_dir():
        pipe = diffusekit.DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
        state = pipeline_to_original(pipe, text_encoder_layout)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(target), metadata={"format": "pt", "converted_by": "diffusekit"})
        elif target.suffix in (".ckpt", ".pt", ".bin"):
            torch.save({"state_dict": state}, target)
        else:
            raise ValueError(f"{target}: the single file must end in .safetensors or .ckpt")
        return target
    pipe = pipeline_from_single_file(source, config=config, tokenizer=tokenizer, prediction_type=prediction_type,
                                     torch_dtype=dtype, extract_ema=extract_ema)
    pipe.save_pretrained(target)
    return target


def pipeline_from_single_file(path: str | os.PathLike, **options):
    """The pipeline of the checkpoint's family (:data:`FAMILY_PIPELINES`; inpainting for 9-channel
    UNets) loaded from one original-layout file; ``options`` as in ``from_single_file``."""
    import diffusekit

    state = read_checkpoint(path)
    name = FAMILY_PIPELINES[detect_family(state)][conv_in_channels(state) == 9]
    pipeline_cls = getattr(diffusekit, name, None)
    if pipeline_cls is None:
        raise ValueError(f"{path}: this checkpoint needs {name}, which this diffusekit lacks")
    return pipeline_cls.from_single_file(path, **options)


__all__ = ["FromSingleFileMixin", "FromOriginalModelMixin", "convert", "pipeline_from_single_file",
           "pipeline_to_original", "read_checkpoint",
           "text_encoder_from_single_file"]
