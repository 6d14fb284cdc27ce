"""Starting noise for the pipelines, drawn so that a seed gives the reference's sample."""

from __future__ import annotations

import torch

from ..utils import Generator, randn_tensor


def check_generators(generator: Generator, batch_size: int) -> None:
    """A list of generators must hold one per image."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(
            f"generator is a list of {len(generator)} generators, but the batch holds {batch_size} images"
        )


def image_shape(model: torch.nn.Module, batch_size: int) -> tuple[int, ...]:
    """(batch, channels, height, width) of a pixel-space UNet's samples, from its config."""
    size = model.config.sample_size
    spatial = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, model.config.in_channels, *spatial)


def initial_noise(shape, generator: Generator, device: torch.device, dtype: torch.dtype,
                  latents: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Noise of ``shape`` times ``scale`` (a scheduler's init_noise_sigma), or the given ``latents``."""
    if latents is None:
        check_generators(generator, shape[0])
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
    else:
        latents = latents.to(device)
    return latents * scale
