"""Timestep and noise-level embeddings shared by the UNets.

- :func:`get_timestep_embedding` -- sinusoidal features of (possibly fractional) timesteps.
- :class:`Timesteps` -- the same as a parameter-free module (``time_proj`` in the UNets).
- :class:`TimestepEmbedding` -- ``linear_1 -> act -> linear_2`` MLP (``time_embedding``).
- :class:`GaussianFourierProjection` -- random Fourier features of ``log(sigma)`` (NCSN++), key ``weight``.
- :func:`get_activation` -- activation module by the reference's names.
- :class:`PixArtAlphaTextProjection`, :class:`CombinedTimestepTextProjEmbeddings` -- the MMDiT (FLUX)
  conditioning vector from timestep, guidance scale and pooled text.
- :func:`rotary_frequencies`, :func:`apply_rotary_emb` -- rotary position embeddings (interleaved pairs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Linear, load_device

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
        self.linear_1 = Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.cond_proj = Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim, sample_proj_bias)
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
        # with set_W_to_weight the reference draws a first weight and replaces it by a second draw
        for _ in range(2 if set_W_to_weight else 1):
            weight = torch.randn(embedding_size, device=load_device()) * scale
        self.weight = nn.Parameter(weight, requires_grad=False)
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


class PixArtAlphaTextProjection(nn.Module):
    """``linear_1 -> act_1 -> linear_2`` projection of a pooled text embedding (act: silu or gelu_tanh)."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None,
                 act_fn: str = "gelu_tanh"):
        super().__init__()
        activations = {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}
        if act_fn not in activations:
            raise ValueError(f"act_fn {act_fn!r} is not one of {sorted(activations)}")
        self.linear_1 = Linear(in_features, hidden_size, bias=True)
        self.act_1 = activations[act_fn]()
        self.linear_2 = Linear(hidden_size, out_features or hidden_size, bias=True)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """Conditioning vector of the MMDiT transformers: timestep MLP + pooled text projection.

    With ``guidance=True`` (FLUX.1-dev's ``CombinedTimestepGuidanceTextProjEmbeddings``) a second
    MLP, ``guidance_embedder``, embeds the distilled guidance scale the same way and is added too.
    """

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, guidance: bool = False):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.guidance_embedder = TimestepEmbedding(256, embedding_dim) if guidance else None
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn="silu")

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        if (guidance is None) != (self.guidance_embedder is None):
            raise ValueError("pass guidance exactly when the model embeds a guidance scale (guidance_embeds)")
        dtype = pooled_projection.dtype
        conditioning = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if guidance is not None:
            conditioning = conditioning + self.guidance_embedder(self.time_proj(guidance).to(dtype))
        return conditioning + self.text_embedder(pooled_projection)


def rotary_frequencies(positions: torch.Tensor, dim: int, theta: float = 10000.0,
                       dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of 1-D ``positions``: ``(cos, sin)``, each (len, dim) float32.

    Angle ``pos * theta ** (-2i / dim)`` for pair ``i``, computed in ``dtype`` and repeated for both
    members of each (even, odd) channel pair, as :func:`apply_rotary_emb` pairs them.
    """
    if dim % 2:
        raise ValueError(f"a rotary embedding needs an even size, got {dim}")
    inverse = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)
    angles = positions.to(dtype)[:, None] * inverse[None, :]
    return (angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float())


def apply_rotary_emb(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], sequence_dim: int = 2) -> torch.Tensor:
    """Rotate each (even, odd) channel pair of ``x`` by its position's angle: ``x cos + rot(x) sin``
    with ``rot(a, b) = (-b, a)``. ``freqs`` from :func:`rotary_frequencies`; ``x`` is
    (batch, heads, seq, dim) with ``sequence_dim=2`` or (batch, seq, heads, dim) with 1."""
    cos, sin = freqs
    if sequence_dim == 1:
        cos, sin = cos[None, :, None], sin[None, :, None]
    elif sequence_dim == 2:
        cos, sin = cos[None, None], sin[None, None]
    else:
        raise ValueError(f"sequence_dim must be 1 or 2, got {sequence_dim}")
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos.to(x.device) + rotated.float() * sin.to(x.device)).to(x.dtype)
