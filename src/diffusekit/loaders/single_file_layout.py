"""Original (CompVis/LDM, Stability) single-file key layout <-> diffusekit's, built from rules.

A Stable Diffusion checkpoint holds its parts under prefixes: :data:`UNET_PREFIX`,
:data:`VAE_PREFIX`, and the text encoder(s) where :data:`FAMILY_TEXT_ENCODERS` says: SD 1.x under
``cond_stage_model.transformer.`` (transformers' CLIP key names), SD 2.x under
``cond_stage_model.model.`` (OpenCLIP names), SDXL base CLIP-L under
``conditioner.embedders.0.transformer.`` and OpenCLIP-bigG under ``conditioner.embedders.1.model.``,
the SDXL refiner its one OpenCLIP-bigG under ``conditioner.embedders.0.model.``. The family is read
from which of these prefixes the file has (:func:`family_of_prefixes`). Each ``*_name_map`` function returns
``{our module path: original module path}`` for a config; a parameter ``<path>.<rest>`` maps by
its longest mapped prefix (:func:`to_original`), so block internals that share names (attention
``transformer_blocks``, ``proj_in``...) need no entry of their own.

UNet rules (``L`` = layers_per_block; ``input_blocks`` / ``output_blocks`` count resnets, attentions
and resamplers in one sequence):

* ``conv_in`` = ``input_blocks.0.0``, ``time_embedding.linear_{1,2}`` = ``time_embed.{0,2}``,
  ``conv_norm_out`` = ``out.0``, ``conv_out`` = ``out.2``; with added embeddings (SDXL)
  ``add_embedding.linear_{1,2}`` = ``label_emb.0.{0,2}``;
* down block ``b``, layer ``l``: ``input_blocks.{1 + b(L+1) + l}`` ``.0`` (resnet) / ``.1`` (attention);
  its downsampler ``input_blocks.{1 + b(L+1) + L}.0.op``;
* mid block: ``middle_block.0`` resnet, ``.1`` attention, ``.2`` resnet;
* up block ``b``, layer ``l`` (L+1 layers): ``output_blocks.{b(L+1) + l}`` ``.0`` / ``.1``; the
  upsampler of the last layer is ``.{2 if attention else 1}.conv``;
* resnet internals: ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` = ``in_layers.0,
  in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection``.

ControlNet rules (:data:`CONTROLNET_PREFIX` in a full checkpoint): the UNet's down path and mid block
as above, ``controlnet_cond_embedding.conv_in`` = ``input_hint_block.0``, ``.blocks.k`` =
``input_hint_block.{2k + 2}``, ``.conv_out`` = the hint block's last conv (SiLUs in between),
``controlnet_down_blocks.i`` = ``zero_convs.i.0``, ``controlnet_mid_block`` = ``middle_block_out.0``.

VAE rules: ``{encoder,decoder}.down_blocks.i.resnets.j`` = ``encoder.down.i.block.j``; decoder up
blocks are numbered backwards (``decoder.up_blocks.k`` = ``decoder.up.{n-1-k}``); resamplers are
``downsample.conv`` / ``upsample.conv``; ``mid_block.resnets.{0,1}`` = ``mid.block_{1,2}``,
``mid_block.attentions.0`` = ``mid.attn_1`` with ``group_norm, to_q, to_k, to_v, to_out.0`` =
``norm, q, k, v, proj_out`` (1x1 convolutions there: the weights are reshaped); ``conv_norm_out`` =
``norm_out``; ``conv_shortcut`` = ``nin_shortcut``.

OpenCLIP rules: ``embeddings.token_embedding`` = ``token_embedding``,
``embeddings.position_embedding.weight`` = ``positional_embedding``, ``final_layer_norm`` =
``ln_final``, ``encoder.layers.i`` = ``transformer.resblocks.i`` with ``layer_norm{1,2}`` =
``ln_{1,2}``, ``mlp.fc{1,2}`` = ``mlp.c_{fc,proj}``, ``self_attn.out_proj`` = ``attn.out_proj`` and
``self_attn.{q,k,v}_proj`` = thirds of ``attn.in_proj_{weight,bias}``; ``text_projection.weight``
(``CLIPTextModelWithProjection``) = ``text_projection`` transposed (OpenCLIP multiplies ``x @ P``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
CONTROLNET_PREFIX = "control_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
OPENCLIP_PROJECTION = "text_projection"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: pipeline component, its tokenizer, where and how it is stored."""

    component: str
    tokenizer: str
    prefix: str
    key_layout: str  # "clip" (transformers names) or "openclip"
    model_class: str  # the class name (diffusekit.models.clip_text, named as transformers names it)
    tokenizer_family: str  # the shipped CLIP tokenizer: "sd1" (pads with <|endoftext|>) or "sd2" (pads with "!")


#: The text encoders of each single-file family (a folder of shipped configs in ``assets/configs``).
FAMILY_TEXT_ENCODERS: dict[str, tuple[TextEncoderSlot, ...]] = {
    "sd1": (TextEncoderSlot("text_encoder", "tokenizer", CLIP_PREFIX, "clip", "CLIPTextModel", "sd1"),),
    "sd2": (TextEncoderSlot("text_encoder", "tokenizer", OPENCLIP_PREFIX, "openclip", "CLIPTextModel", "sd2"),),
    "sdxl": (TextEncoderSlot("text_encoder", "tokenizer", SDXL_CLIP_PREFIX, "clip", "CLIPTextModel", "sd1"),
             TextEncoderSlot("text_encoder_2", "tokenizer_2", SDXL_OPENCLIP_PREFIX, "openclip",
                             "CLIPTextModelWithProjection", "sd2")),
    "sdxl_refiner": (TextEncoderSlot("text_encoder_2", "tokenizer_2", REFINER_OPENCLIP_PREFIX, "openclip",
                                     "CLIPTextModelWithProjection", "sd2"),),
}


def family_of_prefixes(keys) -> str | None:
    """The family whose text-encoder prefixes the checkpoint ``keys`` hold (None: no text encoder)."""
    keys = list(keys)
    return next((family for family, slots in FAMILY_TEXT_ENCODERS.items()
                 if all(any(k.startswith(slot.prefix) for k in keys) for slot in slots)), None)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _inner(ours: str, original: str, names: dict[str, str]) -> dict[str, str]:
    return {f"{ours}.{a}": f"{original}.{b}" for a, b in names.items()}


def _layers_per_block(config) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"the original layout needs one layers_per_block for all blocks, got {layers!r}")
    return layers


def unet_name_map(config) -> dict[str, str]:
    """UNet2DConditionModel module paths -> original ``model.diffusion_model`` paths (no prefix)."""
    layers = _layers_per_block(config)
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if config.get("addition_embed_type") is not None:
        names.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    downs, ups = config["down_block_types"], config["up_block_types"]
    for b, kind in enumerate(downs):
        for layer in range(layers):
            index = 1 + b * (layers + 1) + layer
            names.update(_inner(f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{index}.0", _UNET_RESNET))
            if "CrossAttn" in kind:
                names[f"down_blocks.{b}.attentions.{layer}"] = f"input_blocks.{index}.1"
        if b < len(downs) - 1:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * (layers + 1) + layers}.0.op"
    names.update(_inner("mid_block.resnets.0", "middle_block.0", _UNET_RESNET))
    names["mid_block.attentions.0"] = "middle_block.1"
    names.update(_inner("mid_block.resnets.1", "middle_block.2", _UNET_RESNET))
    for b, kind in enumerate(ups):
        attention = "CrossAttn" in kind
        for layer in range(layers + 1):
            index = b * (layers + 1) + layer
            names.update(_inner(f"up_blocks.{b}.resnets.{layer}", f"output_blocks.{index}.0", _UNET_RESNET))
            if attention:
                names[f"up_blocks.{b}.attentions.{layer}"] = f"output_blocks.{index}.1"
        if b < len(ups) - 1:
            last = b * (layers + 1) + layers
            names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    return names


def controlnet_name_map(config) -> dict[str, str]:
    """ControlNetModel module paths -> original ControlNet paths (no prefix): the UNet's down path
    and mid block, the hint block, the zero convs."""
    names = unet_name_map({**config, "up_block_types": ()})
    hint_convs = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    names["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    names.update({f"controlnet_cond_embedding.blocks.{k}": f"input_hint_block.{2 * k + 2}"
                  for k in range(hint_convs)})
    names["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * hint_convs + 2}"
    blocks = len(config["down_block_types"])
    skips = blocks * (_layers_per_block(config) + 1)  # conv_in's, each layer's, each downsampler's
    names.update({f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(skips)})
    names["controlnet_mid_block"] = "middle_block_out.0"
    return names


def vae_name_map(config) -> dict[str, str]:
    """AutoencoderKL module paths -> original ``first_stage_model`` paths (no prefix)."""
    layers = _layers_per_block(config)
    count = len(config["block_out_channels"])
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                      f"{side}.conv_norm_out": f"{side}.norm_out"})
        for r in (0, 1):
            names.update(_inner(f"{side}.mid_block.resnets.{r}", f"{side}.mid.block_{r + 1}", _VAE_RESNET))
        names.update(_inner(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION))
    for i in range(count):
        for j in range(layers):
            names.update(_inner(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < count - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for k in range(count):
        original = count - 1 - k
        for j in range(layers + 1):
            names.update(_inner(f"decoder.up_blocks.{k}.resnets.{j}", f"decoder.up.{original}.block.{j}", _VAE_RESNET))
        if k < count - 1:
            names[f"decoder.up_blocks.{k}.upsamplers.0.conv"] = f"decoder.up.{original}.upsample.conv"
    return names


def to_original(key: str, names: dict[str, str]) -> str | None:
    """The original name of parameter ``key`` by its longest mapped module prefix (None: unmapped)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        original = names.get(".".join(parts[:cut]))
        if original is not None:
            return ".".join([original, *parts[cut:]])
    return None


def is_vae_attention_weight(original_key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))


def openclip_name(key: str) -> tuple[str, int | None] | None:
    """Our CLIP text-encoder key -> (OpenCLIP key, third of in_proj or None); None for unmapped keys."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if key in fixed:
        return fixed[key], None
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not match:
        return None
    layer, module, kind = match.groups()
    block = f"transformer.resblocks.{layer}"
    if module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
        return f"{block}.attn.in_proj_{kind}", _QKV[module[len("self_attn."):]]
    if module in _OPENCLIP_LAYER:
        return f"{block}.{_OPENCLIP_LAYER[module]}.{kind}", None
    return None


def from_openclip(model_keys, openclip: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(our text-encoder tensors, our keys missing)`` from OpenCLIP tensors (prefix removed)."""
    result, missing = {}, []
    for key in model_keys:
        if key == f"{OPENCLIP_PROJECTION}.weight" and OPENCLIP_PROJECTION in openclip:
            result[key] = openclip[OPENCLIP_PROJECTION].T.contiguous()
            continue
        name = openclip_name(key)
        if name is None or name[0] not in openclip:
            missing.append(key)
            continue
        tensor = openclip[name[0]]
        result[key] = tensor.chunk(3)[name[1]] if name[1] is not None else tensor
    return result, missing


def to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP tensors (no prefix) of our text-encoder state dict; ValueError for unmapped keys."""
    result: dict[str, torch.Tensor] = {}
    thirds: dict[str, list] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key == f"{OPENCLIP_PROJECTION}.weight":
            result[OPENCLIP_PROJECTION] = tensor.T.contiguous()
            continue
        name = openclip_name(key)
        if name is None:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP name")
        if name[1] is None:
            result[name[0]] = tensor
        else:
            thirds.setdefault(name[0], [None, None, None])[name[1]] = tensor
    result.update({name: torch.cat(parts) for name, parts in thirds.items()})
    return result


def ema_key(key: str) -> str:
    """The flat EMA name of a UNet key: ``model.diffusion_model.a.0.w`` -> ``model_ema.diffusion_modela0w``."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


def reshape_like(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """1x1-conv <-> linear weights: reshape when only singleton dimensions differ."""
    if tensor.shape == shape or tensor.numel() != _numel(shape):
        return tensor
    return tensor.reshape(shape)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
