"""UNet1DModel: the 1-D UNet of Dance Diffusion (audio) and of the Diffuser RL planners."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configuration import register_to_config
from ..utils import BaseOutput
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .modeling import ModelMixin
from .unet_1d_blocks import get_down_block, get_mid_block, get_out_block, get_up_block


@dataclass
class UNet1DOutput(BaseOutput):
    """``sample``: ``(batch, channels, length)`` output of :class:`UNet1DModel`."""

    sample: torch.Tensor


class UNet1DModel(ModelMixin):
    """A 1-D UNet mapping a noisy ``(batch, channels, length)`` sample and a timestep to a same-shaped output.

    With ``use_timestep_embedding=False`` (Dance Diffusion) the time features are broadcast along the
    length and concatenated to the input by the first ``DownBlock1DNoSkip``; ``extra_in_channels``
    counts them. With ``use_timestep_embedding=True`` (RL planners) an MLP turns them into a vector fed
    to every temporal residual block.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 65536,
        sample_rate: int | None = None,
        in_channels: int = 2,
        out_channels: int = 2,
        extra_in_channels: int = 0,
        time_embedding_type: str = "fourier",
        time_embedding_dim: int | None = None,
        flip_sin_to_cos: bool = True,
        use_timestep_embedding: bool = False,
        freq_shift: float = 0.0,
        down_block_types: tuple[str, ...] = ("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types: tuple[str, ...] = ("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
        mid_block_type: str = "UNetMidBlock1D",
        out_block_type: str | None = None,
        block_out_channels: tuple[int, ...] = (32, 32, 64),
        act_fn: str | None = None,
        norm_num_groups: int = 8,
        layers_per_block: int = 1,
        downsample_each_block: bool = False,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels):
            raise ValueError(
                f"down_block_types ({len(down_block_types)}) and block_out_channels ({len(block_out_channels)}) "
                "must have the same length"
            )
        self.sample_size = sample_size
        base = block_out_channels[0]

        if time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or base * 2
            if time_embed_dim % 2:
                raise ValueError(f"time_embedding_dim must be even for fourier embeddings, got {time_embed_dim}")
            self.time_proj = GaussianFourierProjection(
                embedding_size=time_embed_dim // 2, set_W_to_weight=False, log=False, flip_sin_to_cos=flip_sin_to_cos
            )
            timestep_input_dim = time_embed_dim
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(base, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
            timestep_input_dim = base
        else:
            raise ValueError(f"time_embedding_type must be 'fourier' or 'positional', got {time_embedding_type!r}")

        if use_timestep_embedding:
            self.time_mlp = TimestepEmbedding(timestep_input_dim, base * 4, act_fn=act_fn, out_dim=base)

        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: the reference's state-dict order
        output_channel = in_channels
        for i, block_type in enumerate(down_block_types):
            input_channel = output_channel + (extra_in_channels if i == 0 else 0)
            output_channel = block_out_channels[i]
            is_final = i == len(block_out_channels) - 1
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=input_channel, out_channels=output_channel,
                temb_channels=base, add_downsample=not is_final or downsample_each_block,
            ))

        self.mid_block = get_mid_block(
            mid_block_type, num_layers=layers_per_block, in_channels=block_out_channels[-1],
            mid_channels=block_out_channels[-1], out_channels=block_out_channels[-1], embed_dim=base,
            add_downsample=downsample_each_block,
        )

        reversed_channels = list(reversed(block_out_channels))
        final_up_channels = out_channels if out_block_type is None else base
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel = output_channel
            output_channel = reversed_channels[i + 1] if i < len(up_block_types) - 1 else final_up_channels
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block, in_channels=prev_output_channel,
                out_channels=output_channel, temb_channels=base,
                add_upsample=i != len(block_out_channels) - 1,
            ))

        num_groups_out = norm_num_groups if norm_num_groups is not None else min(base // 4, 32)
        self.out_block = get_out_block(
            out_block_type=out_block_type, num_groups_out=num_groups_out, embed_dim=base,
            out_channels=out_channels, act_fn=act_fn, fc_dim=block_out_channels[-1] // 4,
        )

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> UNet1DOutput | tuple[torch.Tensor]:
        """Denoise ``sample`` ``(batch, in_channels, length)`` at ``timestep`` (scalar or per-sample)."""
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)

        temb = self.time_proj(timesteps)
        if self.config.use_timestep_embedding:
            temb = self.time_mlp(temb.to(sample.dtype))
        else:
            temb = temb[..., None].to(sample.dtype).expand(sample.shape[0], -1, sample.shape[2])

        skips: list[torch.Tensor] = []
        for block in self.down_blocks:
            sample, block_skips = block(hidden_states=sample, temb=temb)
            skips.extend(block_skips)

        sample = self.mid_block(sample, temb)

        for block in self.up_blocks:
            sample = block(sample, res_hidden_states_tuple=(skips.pop(),), temb=temb)

        if self.out_block is not None:
            sample = self.out_block(sample, temb)

        if not return_dict:
            return (sample,)
        return UNet1DOutput(sample=sample)
