"""Pixels to latents and back through a KL VAE, shared by the latent-diffusion pipelines.

``decode_latents`` adds a safeguard the reference lacks: a float16 VAE whose activations overflow
(the "black image" problem of the original SD VAE in half precision) is re-run in float32.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

from ..utils import Generator

logger = logging.getLogger(__name__)
#: Upcasting moves the (shared) VAE to float32 for a moment: encoding and decoding hold this lock, so
#: that a call in another thread never sees the VAE in the other dtype.
VAE_LOCK = threading.RLock()


def vae_scale_factor(vae) -> int:
    """How many pixels one latent covers per side: 2 ** (number of VAE blocks - 1), 8 without a VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def latent_sample(encoder_output, generator: Generator = None, sample_mode: str = "sample") -> torch.Tensor:
    """Latents from an ``encode`` output: a posterior sample (``generator`` drives it), its mode
    (``sample_mode="argmax"``), or the ``latents`` field of encoders without a distribution."""
    if hasattr(encoder_output, "latent_dist"):
        if sample_mode == "sample":
            return encoder_output.latent_dist.sample(generator)
        if sample_mode == "argmax":
            return encoder_output.latent_dist.mode()
        raise ValueError(f"sample_mode must be 'sample' or 'argmax', got {sample_mode!r}")
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise ValueError(f"{type(encoder_output).__name__} holds neither latent_dist nor latents")


@contextlib.contextmanager
def vae_in_float32(vae, when: bool = True):
    """Run the block with ``vae`` moved to float32 (when ``when``), then move it back to its dtype."""
    dtype = vae.dtype
    if not when or dtype == torch.float32:
        yield vae
        return
    vae.to(torch.float32)
    try:
        yield vae
    finally:
        vae.to(dtype)


def latent_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE config's per-channel ``latents_mean`` / ``latents_std`` as (1, C, 1, 1) tensors, or
    None when the config has not both (SDXL pipelines normalise latents with them)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v).view(1, -1, 1, 1).to(device=device, dtype=dtype) for v in (mean, std))


def _upcast_requested(vae, force_upcast: bool) -> bool:
    """Whether the caller honours the VAE config's ``force_upcast`` (SDXL does, SD does not) and it is set."""
    return force_upcast and bool(getattr(vae.config, "force_upcast", False))


def encode_images(vae, images: torch.Tensor, generator: Generator = None, sample_mode: str = "sample",
                  shift_factor: float = 0.0, force_upcast: bool = False, use_stats: bool = False) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) to scaled latents: ``(latents - shift_factor) * scaling_factor``
    (FLUX and SD3 pass their VAE's ``shift_factor``). With ``force_upcast`` and the VAE config's
    ``force_upcast`` set, the VAE encodes in float32 (the latents come back in its dtype). With
    ``use_stats`` and the config's :func:`latent_stats`: ``(latents - mean) * scaling_factor / std``.

    With a list of generators, image i is encoded alone and sampled with generator i (the
    reference's order of random draws); the list must hold one generator per image.
    """
    if isinstance(generator, (list, tuple)) and len(generator) != images.shape[0]:
        raise ValueError(f"generator is a list of {len(generator)} generators, but there are "
                         f"{images.shape[0]} images to encode")
    with VAE_LOCK:
        latents = _encode(vae, images, generator, sample_mode, force_upcast)
    stats = latent_stats(vae, latents.device, latents.dtype) if use_stats else None
    if stats is not None:
        return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
    if shift_factor:
        latents = latents - shift_factor
    return vae.config.scaling_factor * latents


def _encode(vae, images: torch.Tensor, generator: Generator, sample_mode: str, force_upcast: bool) -> torch.Tensor:
    dtype = vae.dtype
    with vae_in_float32(vae, _upcast_requested(vae, force_upcast)):
        images = images.to(device=vae.device, dtype=vae.dtype)
        if isinstance(generator, (list, tuple)):
            latents = torch.cat([latent_sample(vae.encode(images[i:i + 1]), g, sample_mode)
                                 for i, g in enumerate(generator)])
        else:
            latents = latent_sample(vae.encode(images), generator, sample_mode)
    return latents.to(dtype)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def decode_latents(vae, latents: torch.Tensor, generator: Generator = None, shift_factor: float = 0.0,
                   force_upcast: bool = False, use_stats: bool = False) -> torch.Tensor:
    """Scaled latents to images in [-1, 1] (``vae.decode(latents / scaling_factor + shift_factor)``;
    with ``use_stats`` and the config's :func:`latent_stats`: ``latents * std / scaling_factor + mean``).

    With ``force_upcast`` and the VAE config's ``force_upcast`` set, a float16 VAE decodes in float32
    from the start (as SDXL's reference does).

    If the VAE runs in float16 and the decoded image holds NaN/inf, it is decoded again with the
    VAE temporarily upcast to float32 (the image is returned in float32), and one warning names
    the cause. Non-finite latents cannot be fixed this way; they are reported instead.
    """
    stats = latent_stats(vae, latents.device, latents.dtype) if use_stats else None
    if stats is not None:
        scaled = latents * stats[1] / vae.config.scaling_factor + stats[0]
    else:
        scaled = latents / vae.config.scaling_factor
        if shift_factor:
            scaled = scaled + shift_factor
    with VAE_LOCK:
        return _decode(vae, scaled, latents, generator, force_upcast)


def _decode(vae, scaled: torch.Tensor, latents: torch.Tensor, generator: Generator, force_upcast: bool) -> torch.Tensor:
    if vae.dtype == torch.float16 and _upcast_requested(vae, force_upcast):
        return _decode_float32(vae, scaled, generator)
    image = vae.decode(scaled.to(vae.dtype), return_dict=False, generator=generator)[0]
    if vae.dtype != torch.float16 or _finite(image):
        return image
    if not _finite(latents):
        logger.warning("the latents hold NaN/inf before decoding: the denoising loop overflowed in %s; "
                       "upcasting the VAE cannot help (run the UNet in float32 or bfloat16)", latents.dtype)
        return image
    logger.warning("the VAE decoder overflowed in float16 (NaN/inf in the decoded image, which would come out "
                   "black); decoded again with the VAE in float32. Use a float32 VAE or an fp16-safe VAE to "
                   "skip the second pass.")
    return _decode_float32(vae, scaled, generator)


def _decode_float32(vae, scaled: torch.Tensor, generator: Generator) -> torch.Tensor:
    with vae_in_float32(vae):
        return vae.decode(scaled.float(), return_dict=False, generator=generator)[0]
