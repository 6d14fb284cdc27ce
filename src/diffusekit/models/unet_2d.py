"""UNet2DModel: the unconditional (or class-conditional) pixel-space UNet of DDPM and NCSN++ (score SDE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configuration import register_to_config
from ..utils import BaseOutput
from .layers import Conv2d, Embedding, GroupNorm
from .attention import LEGACY_ATTENTION_RENAMES
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .attention_processor import AttentionProcessorMixin
from .modeling import ModelMixin
from .unet_blocks import UNetMidBlock2D, get_down_block, get_up_block

@dataclass
class UNet2DOutput(BaseOutput):
    """``sample``: the model output, shaped like the input sample."""

    sample: torch.Tensor


def timesteps_for_batch(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar, 0-d or 1-d ``timestep`` as a 1-d tensor of ``batch`` values (ints become ``long``)."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.long
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(device)
    return timestep.expand(batch) if timestep.shape[0] == 1 else timestep


class UNet2DModel(ModelMixin, AttentionProcessorMixin):
    """A 2-D UNet mapping a noisy sample and a timestep (and optional class label) to a sample-shaped output.

    Config keys follow the reference ``UNet2DModel`` (``down_block_types``, ``block_out_channels``,
    ``time_embedding_type`` positional/fourier/learned, ``resnet_time_scale_shift``, ``class_embed_type``...).
    """

    _supports_gradient_checkpointing = True

    legacy_key_renames = LEGACY_ATTENTION_RENAMES

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        if len(down_block_types) != len(up_block_types):
            raise ValueError(f"down_block_types {down_block_types} and up_block_types {up_block_types} differ in length")
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(f"block_out_channels {block_out_channels} does not match down_block_types {down_block_types}")
        self.sample_size = sample_size
        first = block_out_channels[0]
        time_embed_dim = time_embedding_dim or first * 4

        self.conv_in = Conv2d(in_channels, first, kernel_size=3, padding=(1, 1))
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=first, scale=16)
            timestep_input_dim = 2 * first
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(first, flip_sin_to_cos, freq_shift)
            timestep_input_dim = first
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ValueError("num_train_timesteps is required when time_embedding_type is 'learned'")
            self.time_proj = Embedding(num_train_timesteps, first)
            timestep_input_dim = first
        else:
            raise ValueError(f"time_embedding_type {time_embedding_type!r} is not one of positional, fourier, learned")
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"class_embed_type {class_embed_type!r} is not one of None, timestep, identity")

        common = dict(resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                      resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout, temb_channels=time_embed_dim)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: the reference's state-dict order
        output_channel = first
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=input_channel, out_channels=output_channel,
                add_downsample=i < len(block_out_channels) - 1,
                attention_head_dim=attention_head_dim or output_channel, downsample_padding=downsample_padding,
                downsample_type=downsample_type, **common))

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=block_out_channels[-1], temb_channels=time_embed_dim, dropout=dropout,
                resnet_eps=norm_eps, resnet_act_fn=act_fn, output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
                attention_head_dim=attention_head_dim or block_out_channels[-1], resnet_groups=norm_num_groups,
                attn_groups=attn_norm_num_groups, add_attention=add_attention)

        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(block_out_channels) - 1)]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block + 1, in_channels=input_channel,
                out_channels=output_channel, prev_output_channel=prev_output_channel,
                add_upsample=i < len(block_out_channels) - 1,
                attention_head_dim=attention_head_dim or output_channel, upsample_type=upsample_type, **common))

        groups_out = norm_num_groups if norm_num_groups is not None else min(first // 4, 32)
        self.conv_norm_out = GroupNorm(num_channels=first, num_groups=groups_out, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(first, out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """Denoise ``sample`` ``(B, C, H, W)`` at ``timestep``; ``class_labels`` when class-conditional."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timesteps_for_batch(timestep, sample.shape[0], sample.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels is required: this model is class-conditional")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this model has no class embedding")

        skip_sample = sample
        sample = self.conv_in(sample)
        res_samples = [sample]
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, states, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, states = block(hidden_states=sample, temb=emb)
            res_samples.extend(states)

        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)

        skip_sample = None
        for block in self.up_blocks:
            count = len(block.resnets)
            states, res_samples = tuple(res_samples[-count:]), res_samples[:-count]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, states, emb, skip_sample)
            else:
                sample = block(sample, states, emb)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape(sample.shape[0], *([1] * (sample.ndim - 1)))
        return UNet2DOutput(sample=sample) if return_dict else (sample,)
