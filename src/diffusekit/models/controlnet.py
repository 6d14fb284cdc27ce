"""ControlNetModel (Zhang et al., 2023): a trainable copy of a UNet's down path and mid block that
turns a conditioning image (edges, depth, pose...) into residuals added to the UNet's skips.

Built from the UNet's own builders (:mod:`~diffusekit.models.unet_2d_condition`), so parameter
names equal the reference's checkpoint keys. :class:`MultiControlNetModel` runs several nets and
sums their residuals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import register_to_config
from ..loaders.single_file_controlnet import load_controlnet_single_file
from ..loaders.single_file_model import FromOriginalModelMixin
from ..utils import BaseOutput
from .attention import LEGACY_ATTENTION_RENAMES
from .attention_processor import AttentionProcessorMixin
from .embeddings import TimestepEmbedding, Timesteps
from .layers import Conv2d
from .modeling import ModelMixin
from .unet_2d import timesteps_for_batch
from .unet_2d_condition import (
    BlockSettings, UNet2DConditionModel, _to_bias, build_class_embedding, build_conv_in, build_down_blocks,
    build_mid_block, build_time_embedding,
)

__all__ = ["ControlNetConditioningEmbedding", "ControlNetModel", "ControlNetOutput", "MultiControlNetModel"]

CHANNEL_ORDERS = ("rgb", "bgr")
_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclass
class ControlNetOutput(BaseOutput):
    """``down_block_res_samples``: one residual per UNet skip connection (highest resolution first);
    ``mid_block_res_sample``: the residual of the mid block."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


def zeroed(conv: Conv2d) -> Conv2d:
    """``conv`` with its weight and bias set to zero (the ControlNet's output layers start at zero)."""
    if not conv.weight.is_meta:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


def zero_conv(channels: int) -> Conv2d:
    """A zero-initialised 1x1 convolution keeping ``channels``."""
    return zeroed(Conv2d(channels, channels, kernel_size=1))


class ControlNetConditioningEmbedding(nn.Module):
    """The conditioning image -> features at latent size: 3x3 convs with SiLU, each stride-2 pair
    halving the size, and a zero-initialised output conv (``conv_in``, ``blocks``, ``conv_out``)."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: Sequence[int] = (16, 32, 96, 256)) -> None:
        super().__init__()
        self.conv_in = Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for channels_in, channels_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(Conv2d(channels_in, channels_in, kernel_size=3, padding=1))
            self.blocks.append(Conv2d(channels_in, channels_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = zeroed(Conv2d(block_out_channels[-1], conditioning_embedding_channels, kernel_size=3,
                                      padding=1))

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = F.silu(block(embedding))
        return self.conv_out(embedding)


def _check_config(*, down_block_types, block_out_channels, layers_per_block, mid_block_type, class_embed_type,
                  addition_embed_type, controlnet_conditioning_channel_order, conditioning_embedding_out_channels):
    if len(block_out_channels) != len(down_block_types):
        raise ValueError(f"block_out_channels {tuple(block_out_channels)} does not match down_block_types "
                         f"{tuple(down_block_types)}")
    if not isinstance(layers_per_block, int):
        raise ValueError(f"layers_per_block must be an int for a ControlNet, got {layers_per_block!r}")
    if mid_block_type not in _MID_BLOCK_TYPES:
        raise ValueError(f"mid_block_type {mid_block_type!r} is not one of {_MID_BLOCK_TYPES}")
    if class_embed_type not in _CLASS_EMBED_TYPES:
        raise ValueError(f"class_embed_type {class_embed_type!r} is not one of {_CLASS_EMBED_TYPES}")
    if addition_embed_type not in (None, "text_time"):
        raise ValueError(f"addition_embed_type {addition_embed_type!r} is not supported (None, text_time)")
    if controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"controlnet_conditioning_channel_order {controlnet_conditioning_channel_order!r} is not "
                         f"one of {CHANNEL_ORDERS}")
    if not conditioning_embedding_out_channels:
        raise ValueError("conditioning_embedding_out_channels must list at least one channel count")


class ControlNetModel(ModelMixin, AttentionProcessorMixin, FromOriginalModelMixin):
    """A ControlNet: noisy latents, timestep, text embeddings and a conditioning image -> residuals
    for the UNet's down skips and mid block (:class:`ControlNetOutput`).

    Config keys follow the reference ``ControlNetModel``. As in the UNet, ``attention_head_dim`` is
    the number of heads (``num_attention_heads``, when set, takes precedence). SDXL ControlNets use
    ``addition_embed_type="text_time"`` and take ``added_cond_kwargs={"text_embeds", "time_ids"}``.
    """

    _supports_gradient_checkpointing = True
    legacy_key_renames = LEGACY_ATTENTION_RENAMES
    single_file_component = "controlnet"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        _check_config(down_block_types=down_block_types, block_out_channels=block_out_channels,
                      layers_per_block=layers_per_block, mid_block_type=mid_block_type,
                      class_embed_type=class_embed_type, addition_embed_type=addition_embed_type,
                      controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                      conditioning_embedding_out_channels=conditioning_embedding_out_channels)
        first, count = block_out_channels[0], len(down_block_types)
        self.conv_in = build_conv_in(in_channels, first, 3)
        self.time_proj, self.time_embedding, time_embed_dim, timestep_input_dim = build_time_embedding(
            first_channels=first, time_embedding_type="positional", time_embedding_dim=None,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, act_fn=act_fn, timestep_post_act=None,
            time_cond_proj_dim=None)
        self._build_encoder_hid_proj(encoder_hid_dim_type, encoder_hid_dim, cross_attention_dim)
        self.class_embedding = build_class_embedding(
            class_embed_type, num_class_embeds=num_class_embeds, projection_dim=projection_class_embeddings_input_dim,
            time_embed_dim=time_embed_dim, timestep_input_dim=timestep_input_dim, act_fn=act_fn)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            first, conditioning_channels=conditioning_channels,
            block_out_channels=conditioning_embedding_out_channels)

        per_block = BlockSettings.from_config(
            count, only_cross_attention=only_cross_attention,
            attention_head_dim=num_attention_heads or attention_head_dim, cross_attention_dim=cross_attention_dim,
            layers_per_block=layers_per_block, transformer_layers_per_block=transformer_layers_per_block)
        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, use_linear_projection=use_linear_projection,
                      upcast_attention=upcast_attention, resnet_time_scale_shift=resnet_time_scale_shift)
        self.down_blocks = build_down_blocks(down_block_types, block_out_channels, per_block,
                                             downsample_padding=downsample_padding, **common)
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c) for c in _skip_channels(block_out_channels,
                                                                                           layers_per_block))
        self.controlnet_mid_block = zero_conv(block_out_channels[-1])
        self.mid_block = build_mid_block(mid_block_type, block_out_channels, per_block,
                                         output_scale_factor=mid_block_scale_factor, **common)

    # the UNet's own code for the parts the two models share
    _build_encoder_hid_proj = UNet2DConditionModel._build_encoder_hid_proj
    _augment_embedding = UNet2DConditionModel._augment_embedding
    _attentions = UNet2DConditionModel._attentions
    set_attention_slice = UNet2DConditionModel.set_attention_slice
    fuse_qkv_projections = UNet2DConditionModel.fuse_qkv_projections
    unfuse_qkv_projections = UNet2DConditionModel.unfuse_qkv_projections

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, conditioning_channels: int = 3) -> "ControlNetModel":
        """A ControlNet shaped like ``unet`` (its config values), by default starting from its weights."""
        config = unet.config
        controlnet = cls(
            **{key: config.get(key) for key in _FROM_UNET_KEYS if key in config},
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels)
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding",
                         "down_blocks", "mid_block"):
                part = getattr(controlnet, name, None)
                if part is not None:
                    part.load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike,
                         config: str | os.PathLike | dict | None = None, subfolder: str | None = None,
                         torch_dtype: torch.dtype | None = None, **kwargs: Any) -> "ControlNetModel":
        """A ControlNet from one file: the original layout (``control_v11*`` files, or a full
        checkpoint holding ``control_model.*``) or ours. ``config``: a dict, a ControlNet folder, or a
        pipeline folder (``subfolder``, default ``controlnet``); default: the shipped config of the
        file's family (SD 1.x). Other keyword arguments override config entries."""
        return load_controlnet_single_file(cls, pretrained_model_link_or_path, config, subfolder, torch_dtype,
                                           **kwargs)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple:
        """Residuals for a UNet called on ``sample`` ``(B, C, H, W)`` at ``timestep``, from the
        conditioning image ``controlnet_cond`` ``(B, conditioning_channels, 8H, 8W)``, times
        ``conditioning_scale``. ``guess_mode`` scales them from 0.1 (highest resolution) to 1 (mid)."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        attention_mask = _to_bias(attention_mask, sample.dtype)
        emb = self._embedding(sample, timestep, class_labels, timestep_cond, added_cond_kwargs)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        attn_kwargs = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                           cross_attention_kwargs=cross_attention_kwargs)

        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [sample]
        for block in self.down_blocks:
            if block.has_cross_attention:
                sample, states = block(hidden_states=sample, temb=emb, **attn_kwargs)
            else:
                sample, states = block(hidden_states=sample, temb=emb)
            skips.extend(states)
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, **attn_kwargs)
        else:
            sample = self.mid_block(sample, emb)

        down = [conv(skip) for skip, conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(sample)
        down, mid = self._scaled(down, mid, conditioning_scale, guess_mode)
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    def _embedding(self, sample: torch.Tensor, timestep, class_labels, timestep_cond, added_cond_kwargs):
        timesteps = timesteps_for_batch(timestep, sample.shape[0], sample.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels is required: this ControlNet has a class embedding")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=sample.dtype)
        return self._augment_embedding(emb, added_cond_kwargs)

    def _scaled(self, down: list[torch.Tensor], mid: torch.Tensor, scale: float, guess_mode: bool):
        """Residuals times ``scale`` (a log ramp 0.1 -> 1 in guess mode), pooled for ``global_pool_conditions``."""
        pooled = self.config.global_pool_conditions
        if guess_mode and not pooled:
            scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * scale
            down = [residual * s for residual, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [residual * scale for residual in down]
            mid = mid * scale
        if pooled:
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


#: UNet config values a ControlNet made by ``from_unet`` takes over.
_FROM_UNET_KEYS = (
    "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
    "transformer_layers_per_block", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type", "num_class_embeds",
    "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
)


def _skip_channels(block_out_channels: Sequence[int], layers_per_block: int) -> list[int]:
    """The channels of every down-path skip: ``conv_in``'s, each layer's, each downsampler's."""
    channels = [block_out_channels[0]]
    for i, width in enumerate(block_out_channels):
        channels += [width] * (layers_per_block + (i < len(block_out_channels) - 1))
    return channels


class MultiControlNetModel(ModelMixin):
    """Several ControlNets run on the same latents, each on its own image and scale; their
    residuals are summed. Saved as one folder per net: ``path``, ``path_1``, ``path_2``..."""

    def __init__(self, controlnets: Sequence[ControlNetModel]) -> None:
        super().__init__()
        if not controlnets:
            raise ValueError("MultiControlNetModel needs at least one ControlNetModel")
        self.nets = nn.ModuleList(controlnets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: Sequence[torch.Tensor],
        conditioning_scale: Sequence[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The summed ``(down residuals, mid residual)`` of every net (one image and scale per net);
        a tuple whatever ``return_dict`` is, as in the reference."""
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"MultiControlNetModel has {len(self.nets)} nets but got {len(controlnet_cond)} "
                             f"conditioning images and {len(conditioning_scale)} scales")
        down, mid = None, None
        for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets):
            net_down, net_mid = net(sample, timestep, encoder_hidden_states, controlnet_cond=image,
                                    conditioning_scale=scale, class_labels=class_labels, timestep_cond=timestep_cond,
                                    attention_mask=attention_mask, added_cond_kwargs=added_cond_kwargs,
                                    cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode,
                                    return_dict=False)
            if down is None:
                down, mid = net_down, net_mid
            else:
                down = [total + part for total, part in zip(down, net_down)]
                mid = mid + net_mid
        return down, mid

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str = "10GB", **kwargs: Any) -> None:
        """Net ``i`` goes to ``save_directory`` (i = 0) or ``save_directory_i``."""
        for index, net in enumerate(self.nets):
            net.save_pretrained(_net_folder(save_directory, index), safe_serialization=safe_serialization,
                                variant=variant, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, pretrained_model_path: str | os.PathLike, **kwargs: Any) -> "MultiControlNetModel":
        """The nets saved in ``pretrained_model_path``, ``pretrained_model_path_1``, ... (as many as exist)."""
        nets = []
        while _net_folder(pretrained_model_path, len(nets)).is_dir():
            nets.append(ControlNetModel.from_pretrained(_net_folder(pretrained_model_path, len(nets)), **kwargs))
        if not nets:
            raise ValueError(f"no ControlNet folder at {pretrained_model_path}")
        return cls(nets)


def _net_folder(path: str | os.PathLike, index: int) -> Path:
    return Path(path) if index == 0 else Path(f"{os.fspath(path)}_{index}")
