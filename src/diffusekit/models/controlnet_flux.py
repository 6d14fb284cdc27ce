"""FluxControlNetModel (InstantX / Shakker-Labs layout) and FluxMultiControlNetModel.

A FLUX ControlNet is a shortened copy of the FLUX transformer's trunk (see
:func:`~diffusekit.models.transformer_flux.build_flux_trunk`): the packed latents plus the packed,
VAE-encoded control image (through ``controlnet_x_embedder``, zero-initialised) run through
``num_layers`` double-stream and ``num_single_layers`` single-stream blocks, and after each block a
zero-initialised linear map (``controlnet_blocks`` / ``controlnet_single_blocks``) gives the
residual that the transformer adds to its image tokens (each residual serves several consecutive
transformer blocks, see ``FluxTransformer2DModel.forward``).

Union ControlNets (``num_mode``) embed a control mode (``controlnet_mode_embedder``) as one more
text token in front of the prompt's. Models with an ``input_hint_block``
(``conditioning_embedding_channels``, XLabs' layout) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..configuration import init_parameters, register_to_config
from ..utils import BaseOutput
from .attention_processor import AttentionProcessorMixin
from .layers import Embedding, Linear
from .modeling import ModelMixin
from .transformer_flux import FluxTrunkMixin, build_flux_trunk

#: The parts of a FluxTransformer2DModel that ``from_transformer`` copies.
_SHARED_PARTS = ("time_text_embed", "context_embedder", "x_embedder", "transformer_blocks", "single_transformer_blocks")


@dataclass
class FluxControlNetOutput(BaseOutput):
    """The residuals for the transformer's double-stream and single-stream blocks (None when the net has none)."""

    controlnet_block_samples: list[torch.Tensor] | None
    controlnet_single_block_samples: list[torch.Tensor] | None


def _zero_linear(dim: int, out_dim: int) -> Linear:
    layer = Linear(dim, out_dim)
    if layer.weight.device.type != "meta":
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


class FluxControlNetModel(FluxTrunkMixin, ModelMixin, AttentionProcessorMixin):
    """ControlNet for FLUX.1; config keys as the reference's (``num_mode`` for union nets)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        num_mode: int | None = None,
        conditioning_embedding_channels: int | None = None,
    ):
        super().__init__()
        if conditioning_embedding_channels is not None:
            raise ValueError("FluxControlNetModel: conditioning_embedding_channels (an input_hint_block, XLabs' "
                             "layout) is not supported; use a ControlNet that takes VAE-encoded control images")
        self.out_channels = in_channels
        dim = build_flux_trunk(self, in_channels, num_layers, num_single_layers, attention_head_dim,
                               num_attention_heads, joint_attention_dim, pooled_projection_dim, guidance_embeds,
                               axes_dims_rope)
        self.controlnet_blocks = nn.ModuleList(_zero_linear(dim, dim) for _ in range(num_layers))
        self.controlnet_single_blocks = nn.ModuleList(_zero_linear(dim, dim) for _ in range(num_single_layers))
        self.union = num_mode is not None
        if self.union:
            self.controlnet_mode_embedder = Embedding(num_mode, dim)
        self.input_hint_block = None
        self.controlnet_x_embedder = _zero_linear(in_channels, dim)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, num_layers: int = 4, num_single_layers: int = 10,
                         attention_head_dim: int = 128, num_attention_heads: int = 24,
                         load_weights_from_transformer: bool = True) -> "FluxControlNetModel":
        """A ControlNet with ``transformer``'s config (and, by default, its embedders and first blocks)."""
        accepted = init_parameters(cls)
        config = {k: v for k, v in dict(transformer.config).items() if k in accepted}
        config.update(num_layers=num_layers, num_single_layers=num_single_layers,
                      attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads)
        controlnet = cls.from_config(config)
        if load_weights_from_transformer:
            for name in _SHARED_PARTS:
                getattr(controlnet, name).load_state_dict(getattr(transformer, name).state_dict(),
                                                          strict=not name.endswith("blocks"))
        return controlnet

    def _cond_tokens(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        if controlnet_cond.ndim != 3 or controlnet_cond.shape[-1] != self.config.in_channels:
            raise ValueError(f"controlnet_cond must be packed latents (batch, tokens, {self.config.in_channels}), "
                             f"got shape {tuple(controlnet_cond.shape)}")
        return self.controlnet_x_embedder(controlnet_cond)

    def forward(
        self,
        hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        controlnet_mode: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        """Residuals for the transformer's blocks, times ``conditioning_scale``. Inputs as the
        transformer's, plus ``controlnet_cond`` (packed control latents like ``hidden_states``) and, for
        union nets, ``controlnet_mode`` (batch, 1) of mode indices. ``joint_attention_kwargs`` may
        carry the LoRA ``scale``."""
        hidden = self.x_embedder(hidden_states) + self._cond_tokens(controlnet_cond)
        temb = self.conditioning(timestep, guidance, pooled_projections, hidden.dtype)
        context = self.context_embedder(encoder_hidden_states)
        txt_ids, img_ids = self._ids_2d(txt_ids, "txt_ids"), self._ids_2d(img_ids, "img_ids")
        if self.union:
            if controlnet_mode is None:
                raise ValueError("controlnet_mode is required by a union ControlNet (num_mode is set)")
            context = torch.cat([self.controlnet_mode_embedder(controlnet_mode), context], dim=1)
            txt_ids = torch.cat([txt_ids[:1], txt_ids], dim=0)
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

        block_samples = []
        for block, project in zip(self.transformer_blocks, self.controlnet_blocks):
            context, hidden = self._run_block(block, hidden, context, temb, rotary, None)
            block_samples.append(project(hidden) * conditioning_scale)
        single_samples = []
        for block, project in zip(self.single_transformer_blocks, self.controlnet_single_blocks):
            context, hidden = self._run_block(block, hidden, context, temb, rotary, None)
            single_samples.append(project(hidden) * conditioning_scale)
        out = (block_samples or None, single_samples or None)
        return FluxControlNetOutput(*out) if return_dict else out


def _add_residuals(total: list[torch.Tensor] | None, more: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    if total is None or more is None:
        return total
    return [a + b for a, b in zip(total, more)]


class FluxMultiControlNetModel(ModelMixin):
    """Several FLUX ControlNets whose residuals add up; one union net with several conditions runs once
    per condition."""

    def __init__(self, controlnets: Sequence[FluxControlNetModel]):
        super().__init__()
        self.nets = nn.ModuleList(controlnets)

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        raise ValueError("FluxMultiControlNetModel has no folder layout (nor has the reference's); save each of "
                         "its nets (.nets[i].save_pretrained) instead")

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: Sequence[torch.Tensor],
                controlnet_mode: Sequence[torch.Tensor | None], conditioning_scale: Sequence[float],
                return_dict: bool = True, **inputs: Any) -> tuple[list | None, list | None]:
        """``(block residuals, single-block residuals)`` summed over the nets; ``controlnet_mode`` holds
        (batch,) mode tensors (ignored by non-union nets). ``return_dict`` is accepted for the
        reference's signature; the result is always the pair."""
        if not (len(controlnet_cond) == len(controlnet_mode) == len(conditioning_scale)):
            raise ValueError(f"controlnet_cond, controlnet_mode and conditioning_scale must have one entry per "
                             f"condition, got {len(controlnet_cond)}, {len(controlnet_mode)} and "
                             f"{len(conditioning_scale)}")
        nets = list(self.nets) if len(self.nets) > 1 else [self.nets[0]] * len(controlnet_cond)
        if len(nets) != len(controlnet_cond):
            raise ValueError(f"{len(nets)} ControlNets but {len(controlnet_cond)} control conditions")
        blocks = singles = None
        for i, (net, cond, mode, scale) in enumerate(zip(nets, controlnet_cond, controlnet_mode, conditioning_scale)):
            out = net(hidden_states=hidden_states, controlnet_cond=cond,
                      controlnet_mode=None if mode is None else mode[:, None], conditioning_scale=scale,
                      return_dict=False, **inputs)
            blocks, singles = out if i == 0 else (_add_residuals(blocks, out[0]), _add_residuals(singles, out[1]))
        return blocks, singles


__all__ = ["FluxControlNetModel", "FluxControlNetOutput", "FluxMultiControlNetModel"]
