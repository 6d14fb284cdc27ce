"""CLIP's text encoder (``CLIPTextModel``, ``CLIPTextModelWithProjection``) without transformers.

Same module tree and parameter names as transformers' classes (``embeddings.token_embedding``,
``encoder.layers.N.self_attn.q_proj``, ``final_layer_norm``; ``text_model.`` and
``text_projection`` for the projection variant), so transformers' folders load here and our saves
load there; same outputs (``last_hidden_state``, ``pooler_output``, ``text_embeds``,
``hidden_states``). Causal self-attention over the prompt tokens; the pooled state is the one at the
first end-of-text token (the highest token id for old configs whose ``eos_token_id`` is 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import BaseOutput
from .layers import Embedding, LayerNorm, Linear
from .text_encoder import TextConfig, TextEncoderMixin


class CLIPTextConfig(TextConfig):
    """transformers' ``CLIPTextConfig`` keys, with its defaults."""

    model_type = "clip_text_model"
    defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
                    initializer_factor=1.0, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)


@dataclass
class BaseModelOutputWithPooling(BaseOutput):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CLIPTextModelOutput(BaseOutput):
    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def activation(name: str):
    """transformers' activation names used by text encoders."""
    functions = {
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu": F.gelu,
        "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3)))),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
    if name not in functions:
        raise ValueError(f"hidden_act {name!r} is not supported (supported: {', '.join(functions)})")
    return functions[name]


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        if dim % config.num_attention_heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_attention_heads {config.num_attention_heads}")
        self.heads = config.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (Linear(dim, dim) for _ in range(4))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden)), heads(self.k_proj(hidden)), heads(self.v_proj(hidden))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), mask)
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder layers and the final LayerNorm; pooled at the end-of-text token."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPooling | tuple:
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_attentions:
            raise ValueError("output_attentions=True is not supported by diffusekit's CLIP text encoder")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        hidden = self.embeddings(input_ids, position_ids)
        mask = _attention_mask(attention_mask, input_ids.shape[-1], hidden.dtype)
        states = [hidden] if output_hidden_states else None
        for layer in self.encoder.layers:
            hidden = layer(hidden, mask)
            if states is not None:
                states.append(hidden)
        last = self.final_layer_norm(hidden)
        pooled = last[torch.arange(last.shape[0], device=last.device), self._end_positions(input_ids)]
        out = BaseModelOutputWithPooling(last, pooled, tuple(states) if states is not None else None)
        return out if return_dict is not False else out.to_tuple()

    def _end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.eos_token_id == 2:  # configs from before the eos id was set: the highest id
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)


def _attention_mask(attention_mask: torch.Tensor | None, length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """None (plain causal attention) or an additive (B, 1, L, L) mask: causal and padded keys hidden."""
    if attention_mask is None:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class CLIPTextModel(TextEncoderMixin, CLIPTextTransformer):
    """CLIP's text encoder as transformers' ``CLIPTextModel`` (SD 1.x/2.x, FLUX's pooled prompt, SDXL's first)."""

    config_class = CLIPTextConfig
    legacy_prefixes = ("text_model.",)
    ignored_keys = ("position_ids",)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.embeddings.token_embedding = embedding


class CLIPTextModelWithProjection(TextEncoderMixin, nn.Module):
    """CLIP's text encoder plus ``text_projection`` of the pooled state (``text_embeds``; SDXL's second)."""

    config_class = CLIPTextConfig
    ignored_keys = ("position_ids",)

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.text_model.embeddings.token_embedding = embedding

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CLIPTextModelOutput | tuple:
        inner = self.text_model(input_ids, attention_mask, position_ids, output_attentions, output_hidden_states)
        out = CLIPTextModelOutput(self.text_projection(inner.pooler_output), inner.last_hidden_state,
                                  inner.hidden_states)
        return out if return_dict is not False else out.to_tuple()


__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection"]
