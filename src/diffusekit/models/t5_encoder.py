"""T5's encoder (``T5EncoderModel``: FLUX's prompt encoder) without transformers.

Same module tree and parameter names as transformers' class (``shared``, ``encoder.block.N.layer.0
.SelfAttention.q``, ``...layer.1.DenseReluDense.wi_0``, ``encoder.final_layer_norm``), same outputs.
T5 blocks: RMS-normed, unscaled self-attention with a learned bucketed relative-position bias (made
by the first block, shared by all), then a (gated) feed-forward; each residual. In float16 the
feed-forward output layers ``wo`` stay float32 and activations are clamped, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import BaseOutput
from .clip_text import activation
from .layers import Embedding, Linear
from .text_encoder import TextConfig, TextEncoderMixin


class T5Config(TextConfig):
    """transformers' ``T5Config`` keys, with its defaults."""

    model_type = "t5"
    defaults = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                    layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu",
                    is_encoder_decoder=True, use_cache=True, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        name = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if name == "gelu" and self.is_gated_act else name


@dataclass
class BaseModelOutput(BaseOutput):
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class T5LayerNorm(nn.Module):
    """Root-mean-square norm with a scale and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.to(self.weight.dtype)
        return self.weight * hidden


def relative_position_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half per direction, exact up to a quarter, then log-spaced to ``max_distance``."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    distance = relative.abs()
    exact = num_buckets // 2
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    far = torch.minimum(far, torch.full_like(far, num_buckets - 1))
    return buckets + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q, self.k, self.v = (Linear(config.d_model, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, config.d_model, bias=False)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, heads, length, length) bias from the bucketed key - query offsets."""
        positions = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_buckets(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(self.q(hidden)), heads(self.k(hidden)), heads(self.v(hidden))
        scores = q @ k.transpose(-1, -2) + bias  # T5 folds the 1/sqrt(d) scale into its weights
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, self.heads * self.d_kv)
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return hidden + self.SelfAttention(self.layer_norm(hidden), bias)


class T5DenseActDense(nn.Module):
    """``wo(act(wi(x)))``, or gated ``wo(act(wi_0(x)) * wi_1(x))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.act(self.wi_0(hidden)) * self.wi_1(hidden) if self.gated else self.act(self.wi(hidden))
        if inner.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            inner = inner.to(self.wo.weight.dtype)  # wo kept in float32 for float16 models
        return self.wo(inner)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


def _clamp_half(hidden: torch.Tensor) -> torch.Tensor:
    """float16 activations pulled back from infinity (T5's overflow guard)."""
    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.where(torch.isinf(hidden).any(), torch.finfo(hidden.dtype).max - 1000,
                        torch.finfo(hidden.dtype).max)
    return hidden.clamp(min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden = _clamp_half(self.layer[0](hidden, bias))
        return _clamp_half(self.layer[1](hidden))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(T5Block(config, has_relative_attention_bias=i == 0)
                                   for i in range(config.num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5EncoderModel(TextEncoderMixin, nn.Module):
    """T5's encoder as transformers' ``T5EncoderModel``."""

    config_class = T5Config
    tied_keys = {"encoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.shared = embedding
        self.encoder.embed_tokens = embedding

    @classmethod
    def from_state_dict(cls, state, config, source="state dict", dtype=None):
        model = super().from_state_dict(state, config, source=source, dtype=dtype)
        if model.dtype == torch.float16:  # transformers keeps these in float32 for float16 models
            for block in model.encoder.block:
                block.layer[1].DenseReluDense.wo.float()
        return model

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> BaseModelOutput | tuple:
        if output_attentions:
            raise ValueError("output_attentions=True is not supported by diffusekit's T5 encoder")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        length = hidden.shape[1]
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(length, hidden.device).to(hidden.dtype)
        if attention_mask is not None:
            bias = bias + (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        states = []
        for block in self.encoder.block:
            states.append(hidden)
            hidden = block(hidden, bias)
        hidden = self.encoder.final_layer_norm(hidden)
        states.append(hidden)
        out = BaseModelOutput(hidden, tuple(states) if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


__all__ = ["T5Config", "T5EncoderModel"]
