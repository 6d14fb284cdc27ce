"""LDMBertModel: the text encoder of latent diffusion text-to-image (CompVis/ldm-text2im-large-256).

The reference ships it as a transformers ``PreTrainedModel``; its folder holds a transformers
``config.json`` (``model_type: ldmbert``) and ``model.safetensors`` (older saves:
``pytorch_model.bin``). This class reads and writes that same folder without transformers, and the
pipeline's model_index.json names it ``["latent_diffusion", "LDMBertModel"]`` as the reference does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import read_json, register_to_config
from ..hub import resolve_folder
from ..utils import BaseOutput
from ..weights import find_weights, load_weights, save_weights
from .layers import Embedding, LayerNorm, Linear, loading
from .modeling import ModelMixin

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
#: transformers' weights file names: safetensors first, then the legacy pickle.
_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LDMBertOutput(BaseOutput):
    """``last_hidden_state`` (batch, tokens, d_model); ``hidden_states``: every layer's input and the output."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class LDMBertAttention(nn.Module):
    """Multi-head self-attention; q/k/v projections have no bias, the output projection has one."""

    def __init__(self, d_model: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        inner = heads * head_dim
        self.k_proj = Linear(d_model, inner, bias=False)
        self.v_proj = Linear(d_model, inner, bias=False)
        self.q_proj = Linear(d_model, inner, bias=False)
        self.out_proj = Linear(inner, d_model)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, _ = hidden.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(hidden)), split(self.k_proj(hidden)), split(self.v_proj(hidden)),
            attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))


class LDMBertLayer(nn.Module):
    """Pre-norm transformer layer: attention and a two-layer MLP, each with a residual."""

    def __init__(self, config) -> None:
        super().__init__()
        d_model = config.d_model
        self.self_attn = LDMBertAttention(d_model, config.encoder_attention_heads, config.head_dim,
                                          config.attention_dropout)
        self.self_attn_layer_norm = LayerNorm(d_model)
        self.fc1 = Linear(d_model, config.encoder_ffn_dim)
        self.fc2 = Linear(config.encoder_ffn_dim, d_model)
        self.final_layer_norm = LayerNorm(d_model)
        self.activation = _ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.self_attn(self.self_attn_layer_norm(hidden), mask)
        hidden = hidden + F.dropout(attended, self.dropout, self.training)
        mlp = self.activation(self.fc1(self.final_layer_norm(hidden)))
        mlp = self.fc2(F.dropout(mlp, self.activation_dropout, self.training))
        return hidden + F.dropout(mlp, self.dropout, self.training)


@torch.no_grad()
def _init_like_transformers(root: nn.Module, std: float) -> None:
    """The reference's transformers init, drawn after torch's: linear and embedding weights ~ N(0, std),
    linear biases 0, module by module. The reference runs it on the encoder once built, then on
    ``to_logits`` alone (transformers skips modules it has initialised)."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()


class LDMBertEncoder(nn.Module):
    """The weights under ``model.``: token and position embeddings, the layers, a final LayerNorm
    (``LDMBertModel.forward`` runs them)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.d_model)
        self.embed_positions = Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([LDMBertLayer(config) for _ in range(config.encoder_layers)])
        self.layer_norm = LayerNorm(config.d_model)
        self.dropout = config.dropout
        if not loading():
            _init_like_transformers(self, config.init_std)


class LDMBertModel(ModelMixin):
    """The LDM-BERT text encoder; ``model(input_ids)[0]`` is the (batch, tokens, d_model) text embedding.

    Config keys and weight names are those of the reference's transformers ``LDMBertConfig`` /
    ``LDMBertModel``. As in the reference, ``encoder_layerdrop``, ``scale_embedding``,
    ``classifier_dropout`` and ``use_cache`` are kept in the config but change nothing.
    """

    #: model_index.json library of this class: the reference's module for it.
    model_index_library = "latent_diffusion"

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 30522,
        max_position_embeddings: int = 77,
        encoder_layers: int = 32,
        encoder_ffn_dim: int = 5120,
        encoder_attention_heads: int = 8,
        head_dim: int = 64,
        encoder_layerdrop: float = 0.0,
        activation_function: str = "gelu",
        d_model: int = 1280,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        init_std: float = 0.02,
        classifier_dropout: float = 0.0,
        scale_embedding: bool = False,
        use_cache: bool = True,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {activation_function!r} is not one of {sorted(_ACTIVATIONS)}")
        self.model = LDMBertEncoder(self.config)
        self.to_logits = Linear(d_model, vocab_size)
        if not loading():
            _init_like_transformers(self.to_logits, init_std)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> LDMBertOutput | tuple:
        """Encode token ids (or ready embeddings); ``attention_mask`` is 1 for tokens, 0 for padding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        encoder = self.model
        if inputs_embeds is None:
            inputs_embeds = encoder.embed_tokens(input_ids.reshape(-1, input_ids.shape[-1]))
        tokens = inputs_embeds.shape[1]
        if tokens > self.config.max_position_embeddings:
            raise ValueError(f"{tokens} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(tokens, device=inputs_embeds.device)[None]
        hidden = F.dropout(inputs_embeds + encoder.embed_positions(position_ids), encoder.dropout, self.training)
        mask = None
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :].to(torch.bool)
            mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)
        states = []
        for layer in encoder.layers:
            states.append(hidden)
            hidden = layer(hidden, mask)
        hidden = encoder.layer_norm(hidden)
        all_states = tuple(states) + (hidden,) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (hidden, all_states) if v is not None)
        return LDMBertOutput(last_hidden_state=hidden, hidden_states=all_states)

    # -- the transformers folder layout -----------------------------------------------------------

    def to_json_string(self) -> str:
        """config.json in transformers' form, so the reference (transformers) loads the folder too."""
        data = {k: v for k, v in json.loads(super().to_json_string()).items() if not k.startswith("_")}
        data.update(architectures=[type(self).__name__], model_type="ldmbert",
                    dtype=str(self.dtype).removeprefix("torch."))
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str = "10GB") -> None:
        """Write ``config.json`` and ``model.safetensors`` (``pytorch_model.bin`` when not safe)."""
        folder = Path(save_directory)
        self.save_config(folder)
        base = _WEIGHTS_NAMES[0] if safe_serialization else _WEIGHTS_NAMES[1]
        save_weights(self.state_dict(), folder, base=base, variant=variant,
                     safe_serialization=safe_serialization, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        **kwargs: Any,
    ) -> "LDMBertModel":
        """Load the transformers-layout folder (config.json + model.safetensors / pytorch_model.bin)."""
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        kwargs.pop("low_cpu_mem_usage", None)
        folder = resolve_folder(pretrained_model_name_or_path, subfolder=subfolder,
                                allow_patterns=["*.json", "model*.safetensors*", "pytorch_model*.bin*"], **hub)
        config = read_json(folder / cls.config_name)
        config.update(kwargs)
        known, ignored = cls.split_config(config)
        if ignored:
            logger.debug("%s: config keys not used by LDMBertModel: %s", folder, sorted(ignored))
        weights_path = _find_transformers_weights(folder, variant, use_safetensors)
        state = load_weights(weights_path)
        with torch.device("meta"):
            model = cls(**known)
        model.load_checked_state_dict(state, source=weights_path, dtype=torch_dtype)
        return model.eval()


def _find_transformers_weights(folder: Path, variant: str | None, use_safetensors: bool | None) -> Path:
    """``model.safetensors`` (or its shard index), else ``pytorch_model.bin``, honouring ``use_safetensors``."""
    choices = {None: (True, False), True: (True,), False: (False,)}[use_safetensors]
    for safe in choices:
        base = _WEIGHTS_NAMES[0] if safe else _WEIGHTS_NAMES[1]
        try:
            return find_weights(folder, variant=variant, use_safetensors=safe, base=base)
        except FileNotFoundError:
            continue
    wanted = " or ".join(_WEIGHTS_NAMES[0 if c else 1] for c in choices)
    raise FileNotFoundError(f"no weights file in {folder} (looked for {wanted}, variant {variant!r})")
