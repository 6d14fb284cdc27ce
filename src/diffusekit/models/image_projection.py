"""IP-Adapter image projections: CLIP image features -> extra cross-attention tokens for the UNet.

- :class:`ImageProjection` (the plain IP-Adapter; keys ``image_embeds, norm``): one projected CLIP
  image embedding ``(B, D)`` -> ``num_image_text_embeds`` tokens ``(B, N, cross_attention_dim)``.
- :class:`IPAdapterPlusImageProjection` (IP-Adapter Plus, a perceiver resampler; keys ``latents,
  proj_in, layers.{i}.{ln0, ln1, attn, ff}, proj_out, norm_out``): the penultimate hidden states of
  the CLIP vision model ``(B, L, D)`` -> ``num_queries`` tokens.
- :class:`MultiIPAdapterImageProjection` (``image_projection_layers.{i}``): one projection per
  loaded adapter; the UNet's ``encoder_hid_proj`` when ``encoder_hid_dim_type="ip_image_proj"``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, FeedForward
from .layers import LayerNorm, Linear, load_device, loading


class ImageProjection(nn.Module):
    """A linear map of one image embedding to ``num_image_text_embeds`` tokens, then LayerNorm."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768, num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class IPAdapterPlusImageProjectionBlock(nn.Module):
    """One resampler layer: the queries attend to [image features, queries], then a feed-forward."""

    def __init__(self, embed_dims: int = 768, dim_head: int = 64, heads: int = 16, ffn_ratio: float = 4) -> None:
        super().__init__()
        self.ln0 = LayerNorm(embed_dims)
        self.ln1 = LayerNorm(embed_dims)
        self.attn = Attention(query_dim=embed_dims, dim_head=dim_head, heads=heads, out_bias=False)
        self.ff = nn.Sequential(LayerNorm(embed_dims),
                                FeedForward(embed_dims, embed_dims, activation_fn="gelu", mult=ffn_ratio, bias=False))

    def forward(self, x: torch.Tensor, latents: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        queries = self.ln1(latents)
        context = torch.cat([self.ln0(x), queries], dim=-2)
        latents = self.attn(queries, context) + residual
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """The perceiver resampler of IP-Adapter Plus: ``num_queries`` learned queries read the image
    features through ``depth`` attention blocks; out come ``(B, num_queries, output_dims)`` tokens."""

    def __init__(self, embed_dims: int = 768, output_dims: int = 1024, hidden_dims: int = 1280, depth: int = 4,
                 dim_head: int = 64, heads: int = 16, num_queries: int = 8, ffn_ratio: float = 4) -> None:
        super().__init__()
        shape = (1, num_queries, hidden_dims)
        if loading():
            start = torch.empty(shape, device=load_device())
        else:
            start = torch.randn(shape) / hidden_dims**0.5
        self.latents = nn.Parameter(start)
        self.proj_in = Linear(embed_dims, hidden_dims)
        self.proj_out = Linear(hidden_dims, output_dims)
        self.norm_out = LayerNorm(output_dims)
        self.layers = nn.ModuleList(
            IPAdapterPlusImageProjectionBlock(hidden_dims, dim_head, heads, ffn_ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for block in self.layers:
            latents = block(x, latents, latents)
        return self.norm_out(self.proj_out(latents))


class MultiIPAdapterImageProjection(nn.Module):
    """The projections of the loaded adapters; takes and returns one tensor per adapter."""

    def __init__(self, IPAdapterImageProjectionLayers: list[nn.Module] | tuple[nn.Module, ...]):
        super().__init__()
        self.image_projection_layers = nn.ModuleList(IPAdapterImageProjectionLayers)

    @property
    def num_ip_adapters(self) -> int:
        return len(self.image_projection_layers)

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each ``(B, images, ...)`` tensor -> ``(B, images, tokens, cross_attention_dim)``."""
        if not isinstance(image_embeds, (list, tuple)):
            raise ValueError(f"image_embeds must be a list with one tensor per IP-Adapter, got "
                             f"{type(image_embeds).__name__}")
        if len(image_embeds) != len(self.image_projection_layers):
            raise ValueError(f"image_embeds must have the same length as image_projection_layers, got "
                             f"{len(image_embeds)} and {len(self.image_projection_layers)}")
        projected = []
        for embeds, layer in zip(image_embeds, self.image_projection_layers):
            batch, images = embeds.shape[:2]
            tokens = layer(embeds.reshape(batch * images, *embeds.shape[2:]))
            projected.append(tokens.reshape(batch, images, *tokens.shape[1:]))
        return projected
