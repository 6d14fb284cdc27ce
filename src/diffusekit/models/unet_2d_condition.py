"""UNet2DConditionModel: the text-conditioned latent UNet of Stable Diffusion 1.x / 2.x / XL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..configuration import register_to_config
from ..loaders.single_file_model import FromOriginalModelMixin
from ..utils import BaseOutput
from .layers import Conv2d, Embedding, GroupNorm, Linear
from .attention import LEGACY_ATTENTION_RENAMES, Attention
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, get_activation
from .attention_processor import AttentionProcessorMixin
from .cache import CacheMixin
from .freeu import FREEU_KEYS
from .modeling import ModelMixin
from .unet_2d import timesteps_for_batch
from .unet_blocks import get_down_block, get_mid_block, get_up_block


@dataclass
class UNet2DConditionOutput(BaseOutput):
    """``sample``: the model output, shaped like the input sample."""

    sample: torch.Tensor


def _per_block(name: str, value: Any, count: int) -> list:
    """An int/bool/None config value repeated per block, or a per-block list checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries but there are {count} down blocks")
        return list(value)
    return [value] * count


def _to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A keep-mask (1 keep, 0 drop) -> additive bias with a query axis: ``(B, 1, keys)``."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


@dataclass(frozen=True)
class BlockSettings:
    """The per-block config values of a UNet's down path (one entry per down block)."""

    only_cross_attention: list
    heads: list
    cross_attention_dim: list
    layers: list
    transformer_layers: list

    @classmethod
    def from_config(cls, count: int, *, only_cross_attention, attention_head_dim, cross_attention_dim,
                    layers_per_block, transformer_layers_per_block) -> "BlockSettings":
        return cls(_per_block("only_cross_attention", only_cross_attention, count),
                   _per_block("attention_head_dim", attention_head_dim, count),
                   _per_block("cross_attention_dim", cross_attention_dim, count),
                   _per_block("layers_per_block", layers_per_block, count),
                   _per_block("transformer_layers_per_block", transformer_layers_per_block, count))


def build_conv_in(in_channels: int, channels: int, kernel: int) -> nn.Conv2d:
    """The input convolution (``conv_in``), padded to keep the size."""
    return Conv2d(in_channels, channels, kernel_size=kernel, padding=(kernel - 1) // 2)


def build_time_embedding(*, first_channels: int, time_embedding_type: str, time_embedding_dim: int | None,
                         flip_sin_to_cos: bool, freq_shift: int, act_fn: str, timestep_post_act: str | None,
                         time_cond_proj_dim: int | None) -> tuple[nn.Module, TimestepEmbedding, int, int]:
    """``(time_proj, time_embedding, time_embed_dim, timestep_input_dim)``: positional or fourier."""
    if time_embedding_type == "fourier":
        time_embed_dim = time_embedding_dim or first_channels * 2
        if time_embed_dim % 2:
            raise ValueError(f"time_embedding_dim must be even for fourier embeddings, got {time_embed_dim}")
        time_proj = GaussianFourierProjection(time_embed_dim // 2, set_W_to_weight=False, log=False,
                                              flip_sin_to_cos=flip_sin_to_cos)
        timestep_input_dim = time_embed_dim
    elif time_embedding_type == "positional":
        time_embed_dim = time_embedding_dim or first_channels * 4
        time_proj = Timesteps(first_channels, flip_sin_to_cos, freq_shift)
        timestep_input_dim = first_channels
    else:
        raise ValueError(f"time_embedding_type {time_embedding_type!r} is not one of positional, fourier")
    embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn, post_act_fn=timestep_post_act,
                                  cond_proj_dim=time_cond_proj_dim)
    return time_proj, embedding, time_embed_dim, timestep_input_dim


def build_class_embedding(kind: str | None, *, num_class_embeds: int | None, projection_dim: int | None,
                          time_embed_dim: int, timestep_input_dim: int, act_fn: str) -> nn.Module | None:
    """The ``class_embedding`` of a ``class_embed_type`` (None: an embedding table when ``num_class_embeds``)."""
    if kind in ("projection", "simple_projection") and projection_dim is None:
        raise ValueError(f"class_embed_type {kind!r} needs projection_class_embeddings_input_dim")
    if kind is None:
        return Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None
    if kind == "timestep":
        return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
    if kind == "identity":
        return nn.Identity()
    if kind == "projection":
        return TimestepEmbedding(projection_dim, time_embed_dim)
    if kind == "simple_projection":
        return Linear(projection_dim, time_embed_dim)
    raise ValueError(f"class_embed_type {kind!r} is not one of None, timestep, identity, projection, "
                     "simple_projection")


def build_down_blocks(block_types: Sequence[str], block_out_channels: Sequence[int], per_block: BlockSettings,
                      *, downsample_padding: int, after_block: Callable[[int], None] | None = None,
                      **common: Any) -> nn.ModuleList:
    """The down path; ``common`` holds the block arguments shared by all blocks (``temb_channels``...).
    ``after_block(i)`` runs right after block ``i`` is built (a ControlNet builds its convs there,
    keeping the reference's order of random draws)."""
    blocks, output_channel, n = nn.ModuleList(), block_out_channels[0], len(block_types)
    for i, block_type in enumerate(block_types):
        input_channel, output_channel = output_channel, block_out_channels[i]
        heads = per_block.heads[i]
        blocks.append(get_down_block(
            block_type, num_layers=per_block.layers[i], transformer_layers_per_block=per_block.transformer_layers[i],
            in_channels=input_channel, out_channels=output_channel, add_downsample=i < n - 1,
            cross_attention_dim=per_block.cross_attention_dim[i], num_attention_heads=heads,
            downsample_padding=downsample_padding, only_cross_attention=per_block.only_cross_attention[i],
            attention_head_dim=heads if heads is not None else output_channel, **common))
        if after_block is not None:
            after_block(i)
    return blocks


def build_mid_block(block_type: str | None, block_out_channels: Sequence[int], per_block: BlockSettings,
                    *, output_scale_factor: float, **common: Any) -> nn.Module | None:
    """The mid block at the deepest resolution (None for ``mid_block_type=None``)."""
    return get_mid_block(
        block_type, in_channels=block_out_channels[-1], output_scale_factor=output_scale_factor,
        transformer_layers_per_block=per_block.transformer_layers[-1], num_attention_heads=per_block.heads[-1],
        cross_attention_dim=per_block.cross_attention_dim[-1], attention_head_dim=per_block.heads[-1], **common)


def build_up_blocks(block_types: Sequence[str], block_out_channels: Sequence[int], per_block: BlockSettings,
                    reverse_transformer_layers_per_block: Sequence | None = None, **common: Any) -> nn.ModuleList:
    """The up path (the down path's settings reversed; each block has one more layer for the skips)."""
    n = len(block_types)
    channels = list(reversed(block_out_channels))
    heads, layers = list(reversed(per_block.heads)), list(reversed(per_block.layers))
    cross, only_cross = list(reversed(per_block.cross_attention_dim)), list(reversed(per_block.only_cross_attention))
    tlayers = (list(reversed(per_block.transformer_layers)) if reverse_transformer_layers_per_block is None
               else list(reverse_transformer_layers_per_block))
    blocks, output_channel = nn.ModuleList(), channels[0]
    for i, block_type in enumerate(block_types):
        prev_output_channel, output_channel = output_channel, channels[i]
        # attention_head_dim follows the down path's order, as in the reference
        head_dim = per_block.heads[i] if per_block.heads[i] is not None else output_channel
        blocks.append(get_up_block(
            block_type, num_layers=layers[i] + 1, transformer_layers_per_block=tlayers[i],
            in_channels=channels[min(i + 1, n - 1)], out_channels=output_channel,
            prev_output_channel=prev_output_channel, add_upsample=i < n - 1, resolution_idx=i,
            cross_attention_dim=cross[i], num_attention_heads=heads[i], only_cross_attention=only_cross[i],
            attention_head_dim=head_dim, **common))
    return blocks


def build_conv_out(channels: int, out_channels: int, kernel: int, *, norm_num_groups: int | None, norm_eps: float,
                   act_fn: str) -> tuple[nn.GroupNorm | None, nn.Module | None, nn.Conv2d]:
    """``(conv_norm_out, conv_act, conv_out)``; no norm and activation when ``norm_num_groups`` is None."""
    norm = act = None
    if norm_num_groups is not None:
        norm = GroupNorm(num_channels=channels, num_groups=norm_num_groups, eps=norm_eps)
        act = get_activation(act_fn)
    return norm, act, Conv2d(channels, out_channels, kernel_size=kernel, padding=(kernel - 1) // 2)


class UNet2DConditionModel(ModelMixin, AttentionProcessorMixin, FromOriginalModelMixin, CacheMixin):
    """A conditional 2-D UNet: noisy latents, timestep and encoder hidden states -> sample-shaped output.

    Config keys follow the reference ``UNet2DConditionModel``. ``attention_head_dim`` is, as in the
    reference, the number of heads of the cross-attention blocks (an int or one per block).
    SDXL's ``addition_embed_type="text_time"`` takes ``added_cond_kwargs={"text_embeds", "time_ids"}``.
    ``enable_cache`` takes a :class:`~diffusekit.models.cache.DeepCacheConfig`.
    """

    _supports_gradient_checkpointing = True
    #: Block classes that ``pipe.compile(regional=True)`` compiles one by one.
    _repeated_blocks = ("BasicTransformerBlock",)

    legacy_key_renames = LEGACY_ATTENTION_RENAMES
    single_file_component = "unet"

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                           "CrossAttnUpBlock2D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple = 1,
        reverse_transformer_layers_per_block: tuple | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        if num_attention_heads is not None:
            raise ValueError("num_attention_heads cannot be set (as in the reference); use attention_head_dim, "
                             "which is the number of heads of the cross-attention blocks")
        n = len(down_block_types)
        if len(up_block_types) != n:
            raise ValueError(f"down_block_types {down_block_types} and up_block_types {up_block_types} differ in length")
        if len(block_out_channels) != n:
            raise ValueError(f"block_out_channels {block_out_channels} does not match down_block_types")
        if isinstance(transformer_layers_per_block, (list, tuple)) and reverse_transformer_layers_per_block is None:
            if any(isinstance(x, (list, tuple)) for x in transformer_layers_per_block):
                raise ValueError("reverse_transformer_layers_per_block is required when transformer_layers_per_block"
                                 " holds per-layer lists")
        if resnet_skip_time_act or resnet_out_scale_factor != 1.0 or cross_attention_norm is not None:
            raise ValueError("resnet_skip_time_act, resnet_out_scale_factor and cross_attention_norm only apply to "
                             "block types that are not supported")
        self.sample_size = sample_size
        first = block_out_channels[0]
        self.conv_in = build_conv_in(in_channels, first, conv_in_kernel)
        self.time_proj, self.time_embedding, time_embed_dim, timestep_input_dim = build_time_embedding(
            first_channels=first, time_embedding_type=time_embedding_type, time_embedding_dim=time_embedding_dim,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, act_fn=act_fn, timestep_post_act=timestep_post_act,
            time_cond_proj_dim=time_cond_proj_dim)
        self._build_encoder_hid_proj(encoder_hid_dim_type, encoder_hid_dim, cross_attention_dim)
        self.class_embedding = build_class_embedding(
            class_embed_type, num_class_embeds=num_class_embeds,
            projection_dim=projection_class_embeddings_input_dim, time_embed_dim=time_embed_dim,
            timestep_input_dim=timestep_input_dim, act_fn=act_fn)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type is not None:
            raise ValueError(f"addition_embed_type {addition_embed_type!r} is not supported (None, text_time)")
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None

        per_block = BlockSettings.from_config(
            n, only_cross_attention=only_cross_attention, attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim, layers_per_block=layers_per_block,
            transformer_layers_per_block=transformer_layers_per_block)
        common = dict(temb_channels=time_embed_dim * 2 if class_embeddings_concat else time_embed_dim,
                      resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                      dual_cross_attention=dual_cross_attention, use_linear_projection=use_linear_projection,
                      upcast_attention=upcast_attention, resnet_time_scale_shift=resnet_time_scale_shift,
                      attention_type=attention_type, dropout=dropout)
        self.down_blocks = build_down_blocks(down_block_types, block_out_channels, per_block,
                                             downsample_padding=downsample_padding, **common)
        self.up_blocks = nn.ModuleList()  # registered before mid_block: the reference's state-dict order
        self.mid_block = build_mid_block(mid_block_type, block_out_channels, per_block,
                                         output_scale_factor=mid_block_scale_factor, **common)
        self.num_upsamplers = n - 1
        self.up_blocks = build_up_blocks(up_block_types, block_out_channels, per_block,
                                         reverse_transformer_layers_per_block, **common)
        self.conv_norm_out, self.conv_act, self.conv_out = build_conv_out(
            first, out_channels, conv_out_kernel, norm_num_groups=norm_num_groups, norm_eps=norm_eps, act_fn=act_fn)

    def _build_encoder_hid_proj(self, kind: str | None, dim: int | None, cross_dim: Any) -> None:
        if kind is None and dim is not None:
            kind = "text_proj"
            self.register_to_config(encoder_hid_dim_type=kind)
        if kind is not None and dim is None:
            raise ValueError(f"encoder_hid_dim is required when encoder_hid_dim_type is {kind!r}")
        if kind == "text_proj":
            self.encoder_hid_proj = Linear(dim, cross_dim)
        elif kind is None:
            self.encoder_hid_proj = None
        else:
            raise ValueError(f"encoder_hid_dim_type {kind!r} is not supported (None, text_proj)")

    # -- attention utilities ------------------------------------------------------------------------

    def _attentions(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def set_attention_slice(self, slice_size: str | int | Sequence[int | None] | None = "auto") -> None:
        """Compute attention in slices: ``"auto"`` (half the heads), ``"max"`` (one at a time), an int, or one per layer."""
        layers = self._attentions()
        dims = [a.sliceable_head_dim for a in layers]
        if slice_size == "auto":
            sizes = [d // 2 for d in dims]
        elif slice_size == "max":
            sizes = [1] * len(dims)
        elif isinstance(slice_size, (list, tuple)):
            sizes = list(slice_size)
        else:
            sizes = [slice_size] * len(dims)
        if len(sizes) != len(dims):
            raise ValueError(f"slice_size has {len(sizes)} entries but the model has {len(dims)} attention layers")
        for attn, size, dim in zip(layers, sizes, dims):
            if size is not None and size > dim:
                raise ValueError(f"slice_size {size} is larger than the {dim} heads of a layer")
            attn.set_attention_slice(size or None)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on the first two up levels: skip features' low frequencies scaled by ``s1`` / ``s2``,
        backbone features (half the channels) by ``b1`` / ``b2`` (see :mod:`~diffusekit.models.freeu`)."""
        for block in self.up_blocks:
            for key, value in zip(FREEU_KEYS, (s1, s2, b1, b2)):
                setattr(block, key, value)

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            for key in FREEU_KEYS:
                setattr(block, key, None)

    # -- forward ------------------------------------------------------------------------------------

    def _augment_embedding(self, emb: torch.Tensor, added_cond_kwargs: dict | None) -> torch.Tensor:
        if self.config.addition_embed_type != "text_time":
            return emb
        added_cond_kwargs = added_cond_kwargs or {}
        for key in ("text_embeds", "time_ids"):
            if key not in added_cond_kwargs:
                raise ValueError(f"added_cond_kwargs must hold {key!r} for addition_embed_type 'text_time'")
        text_embeds = added_cond_kwargs["text_embeds"]
        time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
        add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        return emb + self.add_embedding(add_embeds)

    def _encoder_states(self, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None) -> Any:
        """``encoder_hid_proj`` applied: to the text states, or, with an IP-Adapter loaded
        (``encoder_hid_dim_type="ip_image_proj"``), the pair ``(text states, image tokens per adapter)``."""
        if self.encoder_hid_proj is None:
            return encoder_hidden_states
        if self.config.encoder_hid_dim_type != "ip_image_proj":
            return self.encoder_hid_proj(encoder_hidden_states)
        if "image_embeds" not in (added_cond_kwargs or {}):
            raise ValueError(f"{type(self).__name__} has the config param `encoder_hid_dim_type` set to "
                             "'ip_image_proj' which requires the keyword argument `image_embeds` to be passed in "
                             "`added_cond_kwargs`")
        text_proj = getattr(self, "text_encoder_hid_proj", None)
        if text_proj is not None:
            encoder_hidden_states = text_proj(encoder_hidden_states)
        return encoder_hidden_states, self.encoder_hid_proj(added_cond_kwargs["image_embeds"])

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        """Predict from ``sample`` ``(B, C, H, W)``, ``timestep`` and ``encoder_hidden_states`` ``(B, L, D)``.

        ``down_block_additional_residuals`` / ``mid_block_additional_residual`` are ControlNet residuals;
        ``down_intrablock_additional_residuals`` are T2I-Adapter features.
        """
        overall_factor = 2**self.num_upsamplers
        forward_upsample_size = any(dim % overall_factor for dim in sample.shape[-2:])
        attention_mask = _to_bias(attention_mask, sample.dtype)
        encoder_attention_mask = _to_bias(encoder_attention_mask, sample.dtype)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = timesteps_for_batch(timestep, sample.shape[0], sample.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels is required: this model has a class embedding")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype=sample.dtype)
            class_emb = self.class_embedding(class_labels).to(dtype=sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        emb = self._augment_embedding(emb, added_cond_kwargs)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self._encoder_states(encoder_hidden_states, added_cond_kwargs)

        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        adapter = list(down_intrablock_additional_residuals or [])
        if down_block_additional_residuals is not None and mid_block_additional_residual is None:
            adapter = list(down_block_additional_residuals)  # the reference's deprecated T2I-Adapter spelling
        attn_kwargs = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                           cross_attention_kwargs=cross_attention_kwargs,
                           encoder_attention_mask=encoder_attention_mask)

        sample = self.conv_in(sample)
        res_samples = [sample]
        for block in self.down_blocks:
            if block.has_cross_attention:
                extra = {"additional_residuals": adapter.pop(0)} if adapter else {}
                sample, states = block(hidden_states=sample, temb=emb, **attn_kwargs, **extra)
            else:
                sample, states = block(hidden_states=sample, temb=emb)
                if adapter:
                    sample = sample + adapter.pop(0)
            res_samples.extend(states)
        if is_controlnet:
            res_samples = [s + r for s, r in zip(res_samples, down_block_additional_residuals)]

        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                sample = self.mid_block(sample, emb, **attn_kwargs)
            else:
                sample = self.mid_block(sample, emb)
            if adapter and sample.shape == adapter[0].shape:
                sample = sample + adapter.pop(0)
        if is_controlnet:
            sample = sample + mid_block_additional_residual

        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            states, res_samples = tuple(res_samples[-count:]), res_samples[:-count]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = res_samples[-1].shape[2:]
            if block.has_cross_attention:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=states,
                               upsample_size=upsample_size, **attn_kwargs)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=states,
                               upsample_size=upsample_size)

        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)
