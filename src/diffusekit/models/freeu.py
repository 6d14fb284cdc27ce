"""FreeU (Si et al. 2023): in the UNet's first two up levels, the backbone features' first half of the
channels is scaled by ``b1`` / ``b2`` and the skip features' lowest frequencies by ``s1`` / ``s2``.

Turned on with ``UNet2DConditionModel.enable_freeu(s1, s2, b1, b2)`` (the values are attributes of
the up blocks, as in the reference; all four must be set and non-zero for FreeU to act).
"""

from __future__ import annotations

import torch

FREEU_KEYS = ("s1", "s2", "b1", "b2")


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """``x`` with its centred ``2 * threshold`` square of spatial frequencies multiplied by ``scale``
    (computed in float32 for bfloat16 inputs and sizes that are not powers of two)."""
    height, width = x.shape[-2:]
    work = x
    if x.dtype == torch.bfloat16 or height & (height - 1) or width & (width - 1):
        work = x.float()
    freq = torch.fft.fftshift(torch.fft.fftn(work, dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(freq.shape, device=x.device)
    rows, cols = height // 2, width // 2
    mask[..., rows - threshold:rows + threshold, cols - threshold:cols + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def apply_freeu(block: torch.nn.Module, hidden_states: torch.Tensor,
                skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states, skip)`` with FreeU applied for an up block at ``resolution_idx`` 0 or 1; unchanged
    otherwise or while FreeU is off. Never writes into the given tensors."""
    values = [getattr(block, key, None) for key in FREEU_KEYS]
    level = getattr(block, "resolution_idx", None)
    if not all(values) or level not in (0, 1):
        return hidden_states, skip
    s1, s2, b1, b2 = values
    backbone, skip_scale = (b1, s1) if level == 0 else (b2, s2)
    half = hidden_states.shape[1] // 2
    hidden_states = torch.cat([hidden_states[:, :half] * backbone, hidden_states[:, half:]], dim=1)
    return hidden_states, fourier_filter(skip, threshold=1, scale=skip_scale)
