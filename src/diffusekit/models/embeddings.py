"""Timestep and noise-level embeddings shared by the UNets.

- :func:`get_timestep_embedding` -- sinusoidal features of (possibly fractional) timesteps.
- :class:`Timesteps` -- the same as a parameter-free module (``time_proj`` in the UNets).
- :class:`TimestepEmbedding` -- ``linear_1 -> act -> linear_2`` MLP (``time_embedding``).
- :class:`GaussianFourierProjection` -- random Fourier features of ``log(sigma)`` (NCSN++), key ``weight``.
- :func:`get_activation` -- activation module by the reference's names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    """An activation module by name: swish/silu, mish, gelu, relu."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"act_fn {name!r} is not one of {sorted(_ACTIVATIONS)}") from None


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding ``[N, embedding_dim]`` of a 1-D tensor of N timesteps.

    Frequencies are ``exp(-log(max_period) * i / (half - downscale_freq_shift))``; the output is
    ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded when the size is odd.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    first, second = torch.sin(args), torch.cos(args)
    if flip_sin_to_cos:
        first, second = second, first
    emb = torch.cat([first, second], dim=-1)
    if embedding_dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps (see :func:`get_timestep_embedding`)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift, self.scale)


class TimestepEmbedding(nn.Module):
    """``linear_1 -> act -> linear_2 [-> post_act]``; with ``cond_proj_dim``, ``cond_proj(condition)`` is added first."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        sample_proj_bias: bool = True,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, sample_proj_bias)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


class GaussianFourierProjection(nn.Module):
    """Fourier features ``[sin, cos](2 pi x w)`` of ``log(x)`` (or ``x`` with ``log=False``); weights in ``weight``."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, set_W_to_weight: bool = True,
                 log: bool = True, flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        proj = x[:, None] * self.weight[None, :] * 2 * math.pi
        first, second = torch.sin(proj), torch.cos(proj)
        if self.flip_sin_to_cos:
            first, second = second, first
        return torch.cat([first, second], dim=-1)
