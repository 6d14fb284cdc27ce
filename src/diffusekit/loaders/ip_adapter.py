"""IP-Adapter: image prompts for the SD / SDXL UNets (:class:`IPAdapterMixin`).

A file (the reference's layout, safetensors first; ``.bin`` only through ``torch.load(weights_only=True)``)
holds ``image_proj.*`` (the image projection) and ``ip_adapter.{k}.to_k_ip.weight`` /
``ip_adapter.{k}.to_v_ip.weight`` for the UNet's cross-attention layers, numbered 1, 3, 5, ... in
``unet.attn_processors`` order. Two kinds: the plain adapter (``image_proj.proj.weight``: CLIP's
projected image embedding -> 4 tokens, :class:`~diffusekit.models.image_projection.ImageProjection`)
and "plus" (``image_proj.latents``: a resampler over CLIP's penultimate hidden states,
:class:`~diffusekit.models.image_projection.IPAdapterPlusImageProjection`).

Loading puts an :class:`~diffusekit.models.attention_processor.IPAdapterAttnProcessor2_0` on every
cross-attention layer, the projections in ``unet.encoder_hid_proj``
(``encoder_hid_dim_type="ip_image_proj"``), and, when the pipeline has none, a transformers
``CLIPVisionModelWithProjection`` image encoder and a ``CLIPImageProcessor``. The scale
(:meth:`IPAdapterMixin.set_ip_adapter_scale`) is pipeline configuration; the image embeddings are
per call (``ip_adapter_image`` / ``ip_adapter_image_embeds``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import resolve_file, resolve_folder, split_hub_kwargs
from ..models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from ..models.image_projection import ImageProjection, IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from ..models.layers import building_for_load
from ..weights import load_file
from .adapter_layers import block_weights

logger = logging.getLogger(__name__)

PARTS = ("image_proj", "ip_adapter")
#: The tokens per image of the plain adapter (fixed by its design, as in the reference).
PLAIN_TOKENS = 4
#: Head width of the plus resampler's attention (the reference's fixed value).
RESAMPLER_HEAD_DIM = 64
#: Resampler key tails of the original layout -> diffusekit's (``layers.{i}.<tail>``).
_RESAMPLER_RENAMES = (("0.norm1.", "ln0."), ("0.norm2.", "ln1."), ("0.to_q.", "attn.to_q."),
                      ("0.to_out.", "attn.to_out.0."), ("1.0.", "ff.0."), ("1.1.", "ff.1.net.0.proj."),
                      ("1.3.", "ff.1.net.2."))


# -- reading ---------------------------------------------------------------------------------------

def _folder_weight_file(folder: Path) -> Path:
    """The one weights file of ``folder`` (``*.safetensors`` first, then ``*.bin``)."""
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{folder} holds several IP-Adapter files ({', '.join(p.name for p in found)}); "
                             "pass weight_name")
    raise FileNotFoundError(f"{folder} holds no IP-Adapter weights (*.safetensors or *.bin)")


def ip_adapter_path(name_or_path: str | os.PathLike, subfolder: str | None, weight_name: str | None,
                    **hub_kwargs) -> Path:
    """The weights file: ``name_or_path`` itself when a file, else ``weight_name`` in the folder or Hub repo
    (a local folder without ``weight_name``: its only weights file)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if weight_name is None:
        if not path.is_dir():
            raise ValueError(f"load_ip_adapter: weight_name is required for {os.fspath(name_or_path)!r}")
        return _folder_weight_file(path / subfolder if subfolder else path)
    return resolve_file(name_or_path, weight_name, subfolder or None, **hub_kwargs)


def split_parts(state: dict, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a nested dict or flat ``image_proj.*`` /
    ``ip_adapter.*`` keys; ValueError naming ``source`` and the key when anything else is found."""
    parts: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
    for key, value in state.items():
        if key in PARTS and isinstance(value, dict):
            parts[key].update(value)
            continue
        part, _, rest = str(key).partition(".")
        if part not in PARTS or not rest:
            raise ValueError(f"{source}: unexpected key {key!r} in an IP-Adapter file (keys start with image_proj. "
                             "or ip_adapter.)")
        parts[part][rest] = value
    for part, tensors in parts.items():
        if not tensors:
            raise ValueError(f"{source}: Required keys are (`image_proj` and `ip_adapter`) missing from the state "
                             f"dict: no {part} entries.")
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{source}: {part}.{key} is a {type(value).__name__}, not a tensor")
    return parts


def read_ip_adapter(name_or_path_or_dict: Any, subfolder: str | None, weight_name: str | None,
                    **hub_kwargs) -> tuple[dict[str, dict[str, torch.Tensor]], str, Path | None]:
    """``(parts, source name, file path or None for a dict)``."""
    if isinstance(name_or_path_or_dict, dict):
        return split_parts(name_or_path_or_dict, "IP-Adapter state dict"), "IP-Adapter state dict", None
    path = ip_adapter_path(name_or_path_or_dict, subfolder, weight_name, **hub_kwargs)
    return split_parts(load_file(path), str(path)), str(path), path


# -- image projections -----------------------------------------------------------------------------

def _load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{source}: the image_proj weights do not fit {type(module).__name__}: {err}") from None
    return module


def _resampler_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plus resampler's original key names -> diffusekit's (``to_kv`` split into ``to_k`` / ``to_v``)."""
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if match is None:
            renamed[key] = value
            continue
        index, tail = match.groups()
        if tail.startswith("0.to_kv."):
            key_part, value_part = value.chunk(2, dim=0)
            suffix = tail[len("0.to_kv."):]
            renamed[f"layers.{index}.attn.to_k.{suffix}"] = key_part
            renamed[f"layers.{index}.attn.to_v.{suffix}"] = value_part
            continue
        for old, new in _RESAMPLER_RENAMES:
            if tail.startswith(old):
                tail = new + tail[len(old):]
                break
        renamed[f"layers.{index}.{tail}"] = value
    return renamed


def _need(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source}: image_proj.{key} is missing")
    return state[key]


def image_projection(state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The image projection of one adapter's ``image_proj`` weights (plain or plus)."""
    if "proj.weight" in state:
        weight = state["proj.weight"]
        with building_for_load("meta"):
            module = ImageProjection(weight.shape[1], weight.shape[0] // PLAIN_TOKENS, PLAIN_TOKENS)
        renamed = {("image_embeds." + k[len("proj."):]) if k.startswith("proj.") else k: v for k, v in state.items()}
        return _load_into(module, renamed, source)
    if "latents" in state:
        state = _resampler_state(state)
        latents = state["latents"]
        to_q = _need(state, "layers.0.attn.to_q.weight", source)
        depth = len({key.split(".")[1] for key in state if key.startswith("layers.")})
        inner = _need(state, "layers.0.ff.1.net.0.proj.weight", source).shape[0]
        with building_for_load("meta"):
            module = IPAdapterPlusImageProjection(
                embed_dims=_need(state, "proj_in.weight", source).shape[1],
                output_dims=_need(state, "proj_out.weight", source).shape[0], hidden_dims=latents.shape[2],
                depth=depth, dim_head=RESAMPLER_HEAD_DIM, heads=to_q.shape[0] // RESAMPLER_HEAD_DIM,
                num_queries=latents.shape[1], ffn_ratio=inner / latents.shape[2])
        return _load_into(module, state, source)
    raise ValueError(f"{source}: image_proj holds an IP-Adapter kind that is not supported (plain: proj.weight, "
                     f"plus: latents); found {sorted(state)[:4]}")


def image_tokens(state: dict[str, torch.Tensor]) -> int:
    """Tokens per image of an adapter's ``image_proj`` weights."""
    return PLAIN_TOKENS if "proj.weight" in state else int(state["latents"].shape[1])


# -- the UNet --------------------------------------------------------------------------------------

def cross_attention_names(unet: nn.Module) -> list[str]:
    """The UNet's cross-attention processor keys, in the order the file numbers them."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def _ip_weights(attention: dict[str, torch.Tensor], key_id: int, layer: nn.Module, source: str) -> dict:
    weights = {}
    for proj in ("to_k_ip", "to_v_ip"):
        key = f"{key_id}.{proj}.weight"
        if key not in attention:
            raise ValueError(f"{source}: ip_adapter.{key} is missing; the file was made for another UNet")
        weight, want = attention[key], (layer.inner_dim, layer.cross_attention_dim)
        if tuple(weight.shape) != want:
            raise ValueError(f"{source}: ip_adapter.{key} has shape {tuple(weight.shape)} but the UNet's layer "
                             f"needs {want}; the file was made for another UNet")
        weights[proj] = weight
    return weights


def ip_attention_processors(unet: nn.Module, adapters: list[dict], sources: list[str]) -> dict[str, nn.Module]:
    """An :class:`IPAdapterAttnProcessor2_0` per cross-attention layer, holding every adapter's weights."""
    names = cross_attention_names(unet)
    layers = unet._attention_layers()
    expected = {f"{2 * i + 1}.{proj}.weight" for i in range(len(names)) for proj in ("to_k_ip", "to_v_ip")}
    for adapter, source in zip(adapters, sources):
        if unknown := sorted(set(adapter["ip_adapter"]) - expected):
            raise ValueError(f"{source}: ip_adapter.{unknown[0]} matches no cross-attention layer of the UNet "
                             f"({len(names)} layers); the file was made for another UNet")
    tokens = [image_tokens(adapter["image_proj"]) for adapter in adapters]
    processors = {}
    for i, name in enumerate(names):
        layer = layers[name]
        per_adapter = [_ip_weights(a["ip_adapter"], 2 * i + 1, layer, s) for a, s in zip(adapters, sources)]
        with building_for_load("meta"):
            processor = IPAdapterAttnProcessor2_0(layer.inner_dim, layer.cross_attention_dim, tokens, scale=1.0)
        state = {f"{proj}.{j}.weight": w[proj] for j, w in enumerate(per_adapter) for proj in w}
        processor.load_state_dict(state, strict=True, assign=True)
        processors[name] = processor
    return processors


def build_ip_adapters(unet: nn.Module, adapters: list[dict],
                      sources: list[str]) -> tuple[dict[str, nn.Module], MultiIPAdapterImageProjection]:
    """``(processors by layer, encoder_hid_proj)`` for ``unet`` from the adapters' weights (``unet`` unchanged)."""
    projection = MultiIPAdapterImageProjection([image_projection(a["image_proj"], s)
                                                for a, s in zip(adapters, sources)])
    return ip_attention_processors(unet, adapters, sources), projection


def attach_ip_adapters(unet: nn.Module, processors: dict[str, nn.Module],
                       projection: MultiIPAdapterImageProjection) -> None:
    """Give ``unet`` the adapters of :func:`build_ip_adapters` (replacing any loaded before)."""
    dtype, device = unet.dtype, unet.device
    if (unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "text_proj"
            and getattr(unet, "text_encoder_hid_proj", None) is None):
        unet.text_encoder_hid_proj = unet.encoder_hid_proj
    unet.set_attn_processor({**unet.attn_processors, **{n: p.to(device, dtype) for n, p in processors.items()}})
    unet.encoder_hid_proj = projection.to(device, dtype)
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")


def detach_ip_adapters(unet: nn.Module) -> None:
    """Undo :func:`attach_ip_adapters`: default processors on the IP layers, ``encoder_hid_proj`` as before."""
    if unet.config.encoder_hid_dim_type != "ip_image_proj":
        return
    text_proj = getattr(unet, "text_encoder_hid_proj", None)
    if text_proj is not None:
        del unet.text_encoder_hid_proj
    unet.encoder_hid_proj = text_proj
    unet.register_to_config(encoder_hid_dim_type=None if text_proj is None else "text_proj")
    unet.set_attn_processor({name: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p
                             for name, p in unet.attn_processors.items()})


def loaded_ip_adapters(unet: nn.Module) -> int:
    """How many IP-Adapters ``unet`` has loaded (0 for none)."""
    projection = unet.encoder_hid_proj if unet.config.encoder_hid_dim_type == "ip_image_proj" else None
    return projection.num_ip_adapters if isinstance(projection, MultiIPAdapterImageProjection) else 0


def _scale_for(name: str, scale: float | dict[str, float], current: float) -> float:
    if not isinstance(scale, dict):
        return scale
    for prefix, value in scale.items():
        if name.startswith(prefix + "."):
            current = value
    return current


# -- the pipeline ----------------------------------------------------------------------------------

def _as_list(value: Any, count: int, name: str) -> list:
    values = value if isinstance(value, list) else [value]
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(f"`weight_name` and `{name}` must have the same length.")
    return values


class IPAdapterMixin:
    """``load_ip_adapter``, ``set_ip_adapter_scale`` and ``unload_ip_adapter`` for pipelines with a ``unet``."""

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict: Any, subfolder: str | list | None = None,
                        weight_name: str | list | None = None, image_encoder_folder: str | None = "image_encoder",
                        **kwargs: Any) -> None:
        """Load one IP-Adapter (or several: lists of sources / subfolders / weight names).

        A source is a file, a folder or Hub repo (with ``subfolder`` / ``weight_name``; a local folder
        without ``weight_name``: its only weights file), or a state dict. When the pipeline has no
        ``image_encoder``, one is loaded from ``image_encoder_folder``: inside ``subfolder`` (a name
        without ``/``; beside a file source), or that path in the repo; None loads none (then pass
        ``ip_adapter_image_embeds``). A missing ``feature_extractor`` becomes a ``CLIPImageProcessor``.
        Hub options (``revision``, ``cache_dir``, ...) as for ``from_pretrained``.
        """
        hub_kwargs = split_hub_kwargs(kwargs)
        kwargs.pop("low_cpu_mem_usage", None)
        if kwargs:
            raise TypeError(f"load_ip_adapter got unexpected keyword arguments {sorted(kwargs)}")
        names = weight_name if isinstance(weight_name, list) else [weight_name]
        sources = _as_list(pretrained_model_name_or_path_or_dict, len(names), "pretrained_model_name_or_path_or_dict")
        subfolders = _as_list(subfolder, len(names), "subfolder")
        read = [read_ip_adapter(src, sub, name, **hub_kwargs) for src, sub, name in zip(sources, subfolders, names)]
        adapters, where = [r[0] for r in read], [r[1] for r in read]
        processors, projection = build_ip_adapters(self.unet, adapters, where)
        self._load_image_encoder(sources[0], read[0][2], subfolders[0], image_encoder_folder, hub_kwargs)
        attach_ip_adapters(self.unet, processors, projection)

    def _load_image_encoder(self, source: Any, path: Path | None, subfolder: str | None,
                            image_encoder_folder: str | None, hub_kwargs: dict) -> None:
        """The reference's image encoder and feature extractor, when the pipeline has slots without them."""
        if hasattr(self, "image_encoder") and self.image_encoder is None:
            if image_encoder_folder is None:
                logger.warning("image_encoder is not loaded since `image_encoder_folder=None` passed. You will not be "
                               "able to use `ip_adapter_image` when calling the pipeline with IP-Adapter. Use "
                               "`ip_adapter_image_embeds` to pass pre-generated image embedding instead.")
            elif path is None:
                raise ValueError("`image_encoder` cannot be loaded because `pretrained_model_name_or_path_or_dict` "
                                 "is a state dict.")
            else:
                self.register_modules(image_encoder=self._image_encoder_from(source, path, subfolder,
                                                                             image_encoder_folder, hub_kwargs))
        if hasattr(self, "feature_extractor") and self.feature_extractor is None:
            from transformers import CLIPImageProcessor

            encoder = getattr(self, "image_encoder", None)
            size = encoder.config.image_size if encoder is not None else 224
            self.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))

    def _image_encoder_from(self, source: Any, path: Path, subfolder: str | None, folder_name: str,
                            hub_kwargs: dict) -> nn.Module:
        from transformers import CLIPVisionModelWithProjection

        if Path(source).expanduser().is_file():
            folder = path.parent / folder_name
            if not folder.is_dir():
                raise FileNotFoundError(f"{path}: no image encoder folder {folder_name!r} beside the IP-Adapter "
                                        "file (pass image_encoder_folder, or image_encoder_folder=None)")
        else:
            sub = Path(subfolder or "", folder_name).as_posix() if "/" not in folder_name else folder_name
            folder = resolve_folder(source, sub, allow_patterns=["*"], **hub_kwargs)
        logger.info("loading image_encoder from %s", folder)
        return CLIPVisionModelWithProjection.from_pretrained(folder, dtype=self.dtype).to(self.device)

    def set_ip_adapter_scale(self, scale: float | dict | list) -> None:
        """The image prompt's weight: one number, the per-block form (``{"down": {"block_2": [0.0, 1.0]},
        "up": ...}``; blocks not named get 0), or a list with one of those per loaded adapter."""
        scales = scale if isinstance(scale, list) else [scale]
        configs = [block_weights(self.unet, s, default=0.0) if isinstance(s, dict) else s for s in scales]
        for name, processor in self.unet.attn_processors.items():
            if not isinstance(processor, IPAdapterAttnProcessor2_0):
                continue
            if len(configs) != len(processor.scale):
                raise ValueError(f"Cannot assign {len(configs)} scale_configs to {len(processor.scale)} IP-Adapter.")
            processor.scale = [_scale_for(name, c, old) for c, old in zip(configs, processor.scale)]

    def unload_ip_adapter(self) -> None:
        """Remove the adapters: the UNet as before loading; the image encoder (and, in pipelines
        without a safety checker, the feature extractor) removed, as the reference does."""
        if getattr(self, "image_encoder", None) is not None:
            self.register_modules(image_encoder=None)
        if not hasattr(self, "safety_checker") and getattr(self, "feature_extractor", None) is not None:
            self.register_modules(feature_extractor=None)
        detach_ip_adapters(self.unet)
