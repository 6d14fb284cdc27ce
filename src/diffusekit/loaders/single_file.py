"""Single-file Stable Diffusion checkpoints (``.safetensors``, or ``.ckpt`` read with
``weights_only=True``) in the original CompVis/Stability layout, loaded offline.

* ``StableDiffusionPipeline.from_single_file(path, config=None, tokenizer=None, prediction_type=None,
  ...)`` (and the img2img / inpainting pipelines, by the same classmethod of :class:`FromSingleFileMixin`);
* ``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file``
  (:class:`~diffusekit.loaders.single_file_model.FromOriginalModelMixin`, which knows no model class;
  this module knows the models) and :func:`text_encoder_from_single_file`;
* :func:`convert` (pipeline folder -> single file, single file -> folder) for ``diffusekit convert``.

The model kind is read from the keys: SD 2.x when the text encoder is OpenCLIP
(``cond_stage_model.model.*``) or the cross-attention is 1024 wide, else SD 1.x; inpainting when
``conv_in`` takes 9 channels. v-prediction cannot be read from the weights: pass
``prediction_type="v_prediction"`` (or a ``config`` whose scheduler says so). Configs come from
``config`` (a diffusers pipeline folder or Hub repo) or, by default, from the SD 1.x / 2.x configs
shipped in ``diffusekit/assets/configs``. The CLIP tokenizer comes from ``tokenizer=``,
``config``'s ``tokenizer/`` folder, or else the one shipped with diffusekit
(:mod:`~diffusekit.loaders.clip_tokenizer`; SD 2.x pads with ``!``), so nothing is downloaded. EMA
weights (``model_ema.*``) are used when present unless ``extract_ema=False``. Key mapping rules: :mod:`~diffusekit.loaders.single_file_layout`.
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


def text_encoder_state(state, model_keys: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """Our CLIPTextModel keys from the checkpoint's CLIP (SD 1.x) or OpenCLIP (SD 2.x) text encoder."""
    openclip = strip_prefix(state, layout.OPENCLIP_PREFIX)
    if openclip:
        result, missing = {}, []
        for key, target in model_keys.items():
            name = layout.openclip_name(key)
            if name is None or name[0] not in openclip:
                missing.append(key)
                continue
            tensor = openclip[name[0]]
            result[key] = tensor.chunk(3)[name[1]] if name[1] is not None else tensor
        if missing:
            raise WeightsError(f"{source}: the OpenCLIP text encoder lacks {clip_list(missing)}")
        return result
    clip = strip_prefix(state, layout.CLIP_PREFIX)
    if not clip:
        raise WeightsError(f"{source}: no text encoder weights (cond_stage_model.transformer.* or "
                           "cond_stage_model.model.*)")
    clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    with_prefix = any(k.startswith("text_model.") for k in model_keys)
    rename = (lambda k: k.removeprefix("text_model.")) if with_prefix else (lambda k: k)
    clip = {k: v for k, v in clip.items() if not k.endswith(_IGNORED_TEXT_KEYS)}
    return convert_keys(model_keys, clip, rename, source, "text encoder")


def text_encoder_from_single_file(path_or_state, config=None, torch_dtype: torch.dtype | None = None,
                                  family: str | None = None):
    """diffusekit's ``CLIPTextModel`` (transformers' layout) from a checkpoint; ``config``: a CLIP
    text config (ours or transformers'), a dict, or a folder with ``config.json`` (default: the
    shipped config of the detected family)."""
    from ..models.clip_text import CLIPTextConfig, CLIPTextModel
    from ..models.modeling import skip_init

    state = path_or_state if isinstance(path_or_state, dict) else read_checkpoint(path_or_state)
    source = "state dict" if isinstance(path_or_state, dict) else str(path_or_state)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif config is None or isinstance(config, (str, os.PathLike)):
        folder = Path(config) if config is not None else None
        config = component_config("text_encoder", family or detect_family(state), folder)
    config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    with skip_init(device="meta"):
        expected = CLIPTextModel(config).state_dict()
    weights = text_encoder_state(state, expected, source)
    return CLIPTextModel.from_state_dict(weights, config, source=source, dtype=torch_dtype or torch.get_default_dtype())


# -- tokenizer and scheduler ----------------------------------------------------------------------


def _tokenizer(family: str, folder: Path | None, text_encoder, source):
    """``folder/tokenizer`` when there is one, else the shipped CLIP tokenizer of ``family``, which
    must fit the text encoder's vocabulary."""
    from transformers import CLIPTokenizer

    from .clip_tokenizer import clip_tokenizer

    if folder is not None and (folder / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer = clip_tokenizer(family)
    vocab_size = getattr(getattr(text_encoder, "config", None), "vocab_size", None)
    if vocab_size is not None and vocab_size != len(tokenizer):
        raise ValueError(f"{source}: the text encoder has {vocab_size} tokens, not the {len(tokenizer)} of the "
                         "shipped CLIP tokenizer; pass tokenizer= or config=<a pipeline folder with tokenizer/>")
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
        if needed("text_encoder"):
            te_config = component_config("text_encoder", family, folder)
            parts["text_encoder"] = text_encoder_from_single_file(state, te_config, torch_dtype, family)
        if needed("scheduler"):
            parts["scheduler"] = _scheduler(family, folder, prediction_type)
        if needed("tokenizer"):
            text_encoder = parts.get("text_encoder", kwargs.get("text_encoder"))
            parts["tokenizer"] = tokenizer if tokenizer is not None else _tokenizer(family, folder, text_encoder,
                                                                                   source)
        for name, parameter in wanted.items():
            if name not in parts and name not in kwargs and parameter.default is inspect.Parameter.empty:
                parts[name] = None
        if needed("requires_safety_checker"):
            kwargs["requires_safety_checker"] = kwargs.get("safety_checker") is not None
        return cls(**parts, **kwargs)


def _init_parameters(pipeline_cls) -> dict[str, inspect.Parameter]:
    """The named parameters of ``pipeline_cls.__init__`` (without ``self``)."""
    parameters = list(inspect.signature(pipeline_cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in parameters if p.kind in kinds}


# -- the way back ---------------------------------------------------------------------------------


def pipeline_to_original(pipe, text_encoder_layout: str | None = None) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a Stable Diffusion pipeline's unet, vae and text encoder.

    ``text_encoder_layout``: "clip" (SD 1.x) or "openclip" (SD 2.x); by default OpenCLIP for text
    encoders with plain GELU (SD 2.x), CLIP otherwise.
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
    text_encoder = pipe.text_encoder
    if text_encoder_layout is None:
        text_encoder_layout = "openclip" if getattr(text_encoder.config, "hidden_act", "") == "gelu" else "clip"
    if text_encoder_layout not in ("clip", "openclip"):
        raise ValueError(f"text_encoder_layout must be 'clip' or 'openclip', got {text_encoder_layout!r}")
    thirds: dict[str, list] = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if text_encoder_layout == "clip":
            state[layout.CLIP_PREFIX + "text_model." + key.removeprefix("text_model.")] = tensor
            continue
        name = layout.openclip_name(key)
        if name is None:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP name")
        if name[1] is None:
            state[layout.OPENCLIP_PREFIX + name[0]] = tensor
        else:
            thirds.setdefault(name[0], [None, None, None])[name[1]] = tensor
    for name, parts in thirds.items():
        state[layout.OPENCLIP_PREFIX + name] = torch.cat(parts)
    return {k: v.detach().contiguous() for k, v in state.items()}


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, *, half: bool = False,
            config: str | os.PathLike | None = None, tokenizer=None, prediction_type: str | None = None,
            extract_ema: bool | None = None, text_encoder_layout: str | None = None) -> Path:
    """Convert between a diffusers pipeline folder and an original single-file checkpoint.

    * ``in_path`` a folder (with model_index.json) -> ``out_path`` a ``.safetensors`` (or ``.ckpt``)
      file in the original layout; ``half`` stores float16; ``text_encoder_layout`` as in
      :func:`pipeline_to_original`.
    * ``in_path`` a file -> ``out_path`` a pipeline folder (``StableDiffusionPipeline``, or
      ``StableDiffusionInpaintPipeline`` for 9-channel UNets); ``config``, ``tokenizer``,
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
    state = read_checkpoint(source)
    nine = conv_in_channels(state) == 9
    pipeline_cls = diffusekit.StableDiffusionInpaintPipeline if nine else diffusekit.StableDiffusionPipeline
    pipe = pipeline_cls.from_single_file(source, config=config, tokenizer=tokenizer, prediction_type=prediction_type,
                                         torch_dtype=dtype, extract_ema=extract_ema)
    pipe.save_pretrained(target)
    return target


__all__ = ["FromSingleFileMixin", "FromOriginalModelMixin", "convert", "pipeline_to_original", "read_checkpoint",
           "text_encoder_from_single_file"]
