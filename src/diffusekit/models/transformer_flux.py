"""FluxTransformer2DModel: the rectified-flow MMDiT of FLUX.1 (Black Forest Labs).

Input: packed latents (batch, image tokens, in_channels) (2x2 patches of the VAE latents, see
:mod:`diffusekit.pipelines.flux_common`), T5 token embeddings (batch, text tokens,
joint_attention_dim), the pooled CLIP embedding, the timestep in [0, 1] (sigma), the guidance
scale of guidance-distilled models, and the (tokens, 3) position ids of text and image tokens.

Layout (state-dict keys as in the reference checkpoints):

- ``x_embedder`` / ``context_embedder``: linear maps of image / text tokens to ``inner_dim``;
- ``time_text_embed``: conditioning vector from timestep (+ guidance) and pooled text;
- ``pos_embed``: 3-axis rotary embedding of the ids (no parameters, computed in forward);
- ``transformer_blocks``: double-stream blocks (separate weights for text and image tokens, joint
  attention over both);
- ``single_transformer_blocks``: single-stream blocks over the concatenated tokens, attention and
  MLP in parallel;
- ``norm_out`` + ``proj_out`` on the image tokens.

Every projection is a plain ``nn.Linear`` attribute (``attn.to_q``, ``attn.add_q_proj``,
``ff.net.0.proj``, ``proj_mlp``, ``proj_out`` ...), so adapters such as LoRA can wrap layers by name.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import register_to_config
from .layers import LayerNorm, Linear, RMSNorm
from .attention import FeedForward, Transformer2DModelOutput
from .embeddings import CombinedTimestepTextProjEmbeddings, apply_rotary_emb, rotary_frequencies
from .attention_processor import AttentionProcessorMixin, AttnProcessor2_0, ProcessorHolder
from .cache import CacheMixin
from .modeling import ModelMixin, maybe_checkpoint
from .normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

logger = logging.getLogger(__name__)

#: joint_attention_kwargs keys the model understands: the LoRA scale (read by LoRA layers, not here)
#: and an attention mask for the joint (text + image) sequence.
JOINT_ATTENTION_KEYS = ("scale", "attention_mask")


class FluxAttention(ProcessorHolder, nn.Module):
    """Multi-head attention with RMSNorm on queries and keys and rotary positions; ``forward`` calls
    ``self.processor`` (see :mod:`.attention_processor`), :meth:`attend` is the default computation.

    With ``added_kv_proj_dim`` (double-stream blocks) the text tokens get their own projections
    (``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``norm_added_q/k``, ``to_add_out``); text and
    image tokens attend jointly, text first, and ``forward`` returns ``(image_out, text_out)``.
    ``pre_only`` (single-stream blocks) leaves out ``to_out``: the raw attention output is returned.
    """

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, bias: bool = False,
                 added_kv_proj_dim: int | None = None, added_proj_bias: bool = True, out_bias: bool = True,
                 eps: float = 1e-5, out_dim: int | None = None, pre_only: bool = False):
        super().__init__()
        self.head_dim = dim_head
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.heads = self.inner_dim // dim_head
        self.use_bias = bias
        self.added_proj_bias = added_proj_bias
        self.added_kv_proj_dim = added_kv_proj_dim
        self.pre_only = pre_only
        self.fused_projections = False

        self.norm_q = RMSNorm(dim_head, eps=eps)
        self.norm_k = RMSNorm(dim_head, eps=eps)
        self.to_q = Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = Linear(query_dim, self.inner_dim, bias=bias)
        self.to_v = Linear(query_dim, self.inner_dim, bias=bias)
        if not pre_only:
            self.to_out = nn.ModuleList([Linear(self.inner_dim, out_dim or query_dim, bias=out_bias),
                                         nn.Dropout(0.0)])
        if added_kv_proj_dim is not None:
            self.norm_added_q = RMSNorm(dim_head, eps=eps)
            self.norm_added_k = RMSNorm(dim_head, eps=eps)
            self.add_q_proj = Linear(added_kv_proj_dim, self.inner_dim, bias=added_proj_bias)
            self.add_k_proj = Linear(added_kv_proj_dim, self.inner_dim, bias=added_proj_bias)
            self.add_v_proj = Linear(added_kv_proj_dim, self.inner_dim, bias=added_proj_bias)
            self.to_add_out = Linear(self.inner_dim, query_dim, bias=out_bias)
        self.processor = AttnProcessor2_0()

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Add ``to_qkv`` (and ``to_added_qkv``): q/k/v in one matmul; the separate layers stay."""
        if self.fused_projections:
            return
        self.to_qkv = _concat_linears([self.to_q, self.to_k, self.to_v], self.use_bias)
        if self.added_kv_proj_dim is not None:
            self.to_added_qkv = _concat_linears([self.add_q_proj, self.add_k_proj, self.add_v_proj],
                                                self.added_proj_bias)
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        for name in ("to_qkv", "to_added_qkv"):
            if hasattr(self, name):
                delattr(self, name)
        self.fused_projections = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))  # (batch, tokens, heads, head_dim)

    def _project(self, x: torch.Tensor, fused: str, names: tuple[str, str, str]):
        if self.fused_projections:
            return getattr(self, fused)(x).chunk(3, dim=-1)
        return tuple(getattr(self, name)(x) for name in names)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any):
        return self.call_processor(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=attention_mask, image_rotary_emb=image_rotary_emb, **kwargs)

    def attend(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any):
        """The default computation (:class:`AttnProcessor2_0`); extra keyword arguments are ignored."""
        query, key, value = map(self._heads, self._project(hidden_states, "to_qkv", ("to_q", "to_k", "to_v")))
        query, key = self.norm_q(query), self.norm_k(key)
        joint = encoder_hidden_states is not None and self.added_kv_proj_dim is not None
        if joint:
            ctx_q, ctx_k, ctx_v = map(self._heads, self._project(
                encoder_hidden_states, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
            query = torch.cat([self.norm_added_q(ctx_q), query], dim=1)
            key = torch.cat([self.norm_added_k(ctx_k), key], dim=1)
            value = torch.cat([ctx_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not joint:
            return out if self.pre_only else self.to_out[1](self.to_out[0](out))
        text_len = encoder_hidden_states.shape[1]
        context_out, out = out[:, :text_len], out[:, text_len:]
        return self.to_out[1](self.to_out[0](out.contiguous())), self.to_add_out(context_out.contiguous())


def _concat_linears(layers: Sequence[nn.Linear], bias: bool) -> nn.Linear:
    weight = torch.cat([layer.weight for layer in layers])
    fused = Linear(weight.shape[1], weight.shape[0], bias=bias, device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight)
    if bias:
        fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text tokens each get adaLN-Zero modulation, a share of the
    joint attention and a gated GELU MLP, with their own weights (``*_context`` for text)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=True,
                                  added_kv_proj_dim=dim, out_dim=dim, eps=eps)
        self.norm2 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.norm2_context = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None = None):
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
        attn_out, context_attn_out = self.attn(x, c, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)

        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(x)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(c)
        return _clip_fp16(encoder_hidden_states), hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on ``[text, image]`` tokens: ``x + gate * proj_out([attn(n), gelu(proj_mlp(n))])``
    with ``n`` the adaLN-modulated input."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=True,
                                  out_dim=dim, eps=1e-6, pre_only=True)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None = None):
        text_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        x, gate = self.norm(residual, emb=temb)
        attn_out = self.attn(x, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        mlp_out = self.act_mlp(self.proj_mlp(x))
        out = _clip_fp16(residual + gate[:, None] * self.proj_out(torch.cat([attn_out, mlp_out], dim=2)))
        return out[:, :text_len], out[:, text_len:]


class FluxPosEmbed(nn.Module):
    """Rotary embedding of (tokens, n_axes) position ids: axis ``i`` fills ``axes_dim[i]`` channels."""

    def __init__(self, theta: int, axes_dim: Sequence[int]):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids have {ids.shape[-1]} axes but axes_dims_rope names {len(self.axes_dim)}")
        positions = ids.float()
        dtype = torch.float32 if ids.device.type == "mps" else torch.float64  # mps has no float64
        parts = [rotary_frequencies(positions[:, i], dim, self.theta, dtype) for i, dim in enumerate(self.axes_dim)]
        return torch.cat([cos for cos, _ in parts], dim=-1), torch.cat([sin for _, sin in parts], dim=-1)


def build_flux_trunk(model: nn.Module, in_channels: int, num_layers: int, num_single_layers: int,
                     attention_head_dim: int, num_attention_heads: int, joint_attention_dim: int,
                     pooled_projection_dim: int, guidance_embeds: bool, axes_dims_rope: Sequence[int]) -> int:
    """Give ``model`` the parts that the FLUX transformer and its ControlNet share (``pos_embed``,
    ``time_text_embed``, ``context_embedder``, ``x_embedder``, ``transformer_blocks``,
    ``single_transformer_blocks``); returns the inner width (``model.inner_dim``)."""
    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must add up to attention_head_dim "
                         f"({attention_head_dim})")
    model.inner_dim = dim = num_attention_heads * attention_head_dim
    model.gradient_checkpointing = False
    model.pos_embed = FluxPosEmbed(theta=10000, axes_dim=axes_dims_rope)
    model.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim, guidance=guidance_embeds)
    model.context_embedder = Linear(joint_attention_dim, dim)
    model.x_embedder = Linear(in_channels, dim)
    model.transformer_blocks = nn.ModuleList(
        FluxTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers))
    model.single_transformer_blocks = nn.ModuleList(
        FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers))
    return dim


class FluxTrunkMixin:
    """Input embedding steps of a model built by :func:`build_flux_trunk`."""

    def _run_block(self, block: nn.Module, *args: Any):
        return maybe_checkpoint(self, block, *args)

    @staticmethod
    def _ids_2d(ids: torch.Tensor, name: str) -> torch.Tensor:
        if ids.ndim == 3:
            logger.warning("%s with a batch dimension is deprecated; pass a 2-D (tokens, 3) tensor", name)
            return ids[0]
        if ids.ndim != 2:
            raise ValueError(f"{name} must be (tokens, 3), got shape {tuple(ids.shape)}")
        return ids

    def conditioning(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled_projections: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """The blocks' conditioning vector from sigma, the distilled guidance and the pooled text."""
        timestep = timestep.to(dtype) * 1000
        guidance = guidance.to(dtype) * 1000 if guidance is not None else None
        return self.time_text_embed(timestep, pooled_projections, guidance)


class FluxTransformer2DModel(FluxTrunkMixin, ModelMixin, AttentionProcessorMixin, CacheMixin):
    """The FLUX.1 transformer; see the module docstring. Defaults are FLUX.1's sizes (dev adds
    ``guidance_embeds=True``). ``enable_cache`` takes a FirstBlockCacheConfig or FasterCacheConfig."""

    _supports_gradient_checkpointing = True
    #: Block classes that ``pipe.compile(regional=True)`` compiles one by one.
    _repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    _cache_timestep_scale = 1000.0  # forward's timestep (sigma) times this is the schedule's timestep

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
    ):
        super().__init__()
        self.out_channels = out_channels or in_channels
        dim = build_flux_trunk(self, in_channels, num_layers, num_single_layers, attention_head_dim, num_attention_heads,
                               joint_attention_dim, pooled_projection_dim, guidance_embeds, axes_dims_rope)
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = Linear(dim, patch_size * patch_size * self.out_channels, bias=True)

    # -- options --------------------------------------------------------------------------------

    # -- forward --------------------------------------------------------------------------------

    @staticmethod
    def _attention_mask(joint_attention_kwargs: dict[str, Any] | None) -> torch.Tensor | None:
        options = dict(joint_attention_kwargs or {})
        unknown = sorted(set(options) - set(JOINT_ATTENTION_KEYS))
        if unknown:
            logger.warning("joint_attention_kwargs %s are not used by FluxTransformer2DModel and are ignored", unknown)
        return options.get("attention_mask")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | None = None,
        controlnet_single_block_samples: Sequence[torch.Tensor] | None = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ):
        """Predict the flow velocity for packed latents ``hidden_states`` (batch, tokens, in_channels).

        ``timestep`` and ``guidance`` are per sample, ``timestep`` as sigma in [0, 1] (both are
        multiplied by 1000 before the sinusoidal embedding). ``img_ids`` / ``txt_ids`` are (tokens, 3)
        position ids. ``joint_attention_kwargs`` may hold ``attention_mask`` (added to the attention
        logits, or a boolean keep-mask, over the ``[text, image]`` sequence) and the LoRA ``scale``.
        ControlNet residuals are added after the blocks as in the reference.
        """
        attention_mask = self._attention_mask(joint_attention_kwargs)
        dtype = hidden_states.dtype
        hidden_states = self.x_embedder(hidden_states)
        temb = self.conditioning(timestep, guidance, pooled_projections, dtype)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        ids = torch.cat([self._ids_2d(txt_ids, "txt_ids"), self._ids_2d(img_ids, "img_ids")], dim=0)
        rotary = self.pos_embed(ids)

        for i, block in enumerate(self.transformer_blocks):
            encoder_hidden_states, hidden_states = self._run_block(
                block, hidden_states, encoder_hidden_states, temb, rotary, attention_mask)
            if controlnet_block_samples is not None:
                if controlnet_blocks_repeat:  # XLabs ControlNets
                    residual = controlnet_block_samples[i % len(controlnet_block_samples)]
                else:
                    interval = int(np.ceil(len(self.transformer_blocks) / len(controlnet_block_samples)))
                    residual = controlnet_block_samples[i // interval]
                hidden_states = hidden_states + residual
        for i, block in enumerate(self.single_transformer_blocks):
            encoder_hidden_states, hidden_states = self._run_block(
                block, hidden_states, encoder_hidden_states, temb, rotary, attention_mask)
            if controlnet_single_block_samples is not None:
                interval = int(np.ceil(len(self.single_transformer_blocks) / len(controlnet_single_block_samples)))
                hidden_states = hidden_states + controlnet_single_block_samples[i // interval]

        output = self.proj_out(self.norm_out(hidden_states, temb))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
