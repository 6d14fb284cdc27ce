"""Adaptive layer norms of the diffusion transformers (DiT / MMDiT / FLUX).

Each takes a conditioning vector ``emb`` (batch, dim), projects ``silu(emb)`` with ``linear`` into
shift/scale(/gate) vectors and modulates an affine-free LayerNorm: ``norm(x) * (1 + scale) + shift``.

- :class:`AdaLayerNormZero` -- 6 vectors: modulated input for attention plus the attention gate and
  the shift/scale/gate the block applies around its MLP.
- :class:`AdaLayerNormZeroSingle` -- 3 vectors: one modulation and one gate (FLUX single-stream blocks).
- :class:`AdaLayerNormContinuous` -- 2 vectors, scale first then shift (the final norm before ``proj_out``).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm, Linear


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample (batch, dim) vectors broadcast over the tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(dim: int, eps: float, norm_type: str) -> nn.LayerNorm:
    if norm_type != "layer_norm":
        raise ValueError(f"norm_type {norm_type!r} is not supported (layer_norm)")
    return LayerNorm(dim, elementwise_affine=False, eps=eps)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: returns ``(modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``."""

    def __init__(self, embedding_dim: int, norm_type: str = "layer_norm", bias: bool = True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = Linear(embedding_dim, 6 * embedding_dim, bias=bias)
        self.norm = _layer_norm(embedding_dim, 1e-6, norm_type)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        return _modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """adaLN-Zero with one modulation: returns ``(modulated x, gate)``."""

    def __init__(self, embedding_dim: int, norm_type: str = "layer_norm", bias: bool = True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = Linear(embedding_dim, 3 * embedding_dim, bias=bias)
        self.norm = _layer_norm(embedding_dim, 1e-6, norm_type)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return _modulate(self.norm(x), shift, scale), gate


class AdaLayerNormContinuous(nn.Module):
    """``norm(x) * (1 + scale) + shift`` from ``linear(silu(conditioning))`` = ``[scale, shift]``."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, elementwise_affine: bool = True,
                 eps: float = 1e-5, bias: bool = True, norm_type: str = "layer_norm"):
        super().__init__()
        if norm_type != "layer_norm":
            raise ValueError(f"norm_type {norm_type!r} is not supported (layer_norm)")
        self.silu = nn.SiLU()
        self.linear = Linear(conditioning_embedding_dim, 2 * embedding_dim, bias=bias)
        self.norm = LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine, bias=bias)

    def forward(self, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        return _modulate(self.norm(x), shift, scale)
