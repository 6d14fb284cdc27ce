"""Classifier-free guidance, shared by the Stable Diffusion family of pipelines.

The pipelines run the unconditional and the conditional branch as one batch (unconditional half
first) and combine the two halves here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def uses_guidance(guidance_scale: float, unet: torch.nn.Module | None = None) -> bool:
    """Whether to run the unconditional branch: ``guidance_scale > 1`` and the UNet is not
    guidance-distilled (a UNet with ``time_cond_proj_dim`` takes the scale as an embedding instead)."""
    distilled = unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None
    return guidance_scale > 1 and not distilled


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor,
                      guidance_rescale: float = 0.0) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back towards the conditional one's.

    From "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al., 2023), section
    3.4: ``guidance_rescale`` = 0 keeps ``noise_cfg``; 1 rescales it fully to the std of
    ``noise_pred_text`` (fixes over-exposure with zero-terminal-SNR schedules).
    """
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def apply_guidance(noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Combine a batched ``[unconditional, conditional]`` prediction: ``u + s * (c - u)``,
    then :func:`rescale_noise_cfg` when ``guidance_rescale > 0``."""
    uncond, cond = noise_pred.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale)
    return guided


def guided_noise(denoiser: Callable, scale_input: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, t,
                 prompt_embeds: torch.Tensor, guided: bool, guidance_scale, guidance_rescale: float = 0.0,
                 extra_channels: torch.Tensor | None = None, options: dict[str, Any] | None = None) -> torch.Tensor:
    """One guided prediction: the latents doubled with guidance, scaled by ``scale_input``, with
    ``extra_channels`` concatenated, through ``denoiser(input, t, encoder_hidden_states=..., **options)``,
    and the halves combined by :func:`apply_guidance`. Host-sync free, so a compiled whole step
    (:mod:`~diffusekit.pipelines.whole_step`) traces it as is (``guidance_scale`` may be a tensor)."""
    model_input = scale_input(torch.cat([latents] * 2) if guided else latents)
    if extra_channels is not None:
        model_input = torch.cat([model_input, extra_channels], dim=1)
    noise_pred = denoiser(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False, **(options or {}))[0]
    if guided:
        noise_pred = apply_guidance(noise_pred, guidance_scale, guidance_rescale)
    return noise_pred


def guidance_scale_embedding(guidance_scale: float, batch_size: int, embedding_dim: int,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of ``guidance_scale - 1`` (times 1000) for guidance-distilled UNets
    (``timestep_cond``), shaped (batch_size, embedding_dim)."""
    w = torch.tensor(guidance_scale - 1).repeat(batch_size) * 1000.0
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step)
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
