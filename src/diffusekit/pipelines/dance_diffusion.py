"""DanceDiffusionPipeline: unconditional audio generation with a UNet1DModel (harmonai/maestro-150k),
and ``write_wav`` to save its output."""

from __future__ import annotations

import logging
import os
import wave
from pathlib import Path

import numpy as np
import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .noise import initial_noise
from .pipeline_utils import AudioPipelineOutput, DiffusionPipeline

logger = logging.getLogger(__name__)


class DanceDiffusionPipeline(DiffusionPipeline):
    """Audio diffusion: ``unet`` (UNet1DModel, with ``sample_rate`` in its config) denoises a
    (batch, channels, samples) waveform; usually with an IPNDMScheduler."""

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 100,
        generator: Generator = None,
        audio_length_in_s: float | None = None,
        return_dict: bool = True,
    ):
        """Generate ``audio_length_in_s`` seconds (default: the unet's ``sample_size``) in [-1, 1]."""
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps)
        rate = self.unet.config.sample_rate
        if not rate:
            raise ValueError("unet.config.sample_rate is not set; DanceDiffusionPipeline needs it")
        if audio_length_in_s is None:
            audio_length_in_s = self.unet.config.sample_size / rate
        wanted = audio_length_in_s * rate
        multiple = 2 ** len(self.unet.up_blocks)
        if wanted < 3 * multiple:
            raise ValueError(f"audio_length_in_s={audio_length_in_s} is too short; "
                             f"the minimum is {3 * multiple / rate} s")
        length = int(wanted)
        if wanted % multiple:
            length = int((wanted // multiple + 1) * multiple)
            logger.info("generating %s s (a multiple of %d samples), cut to %s s afterwards",
                        length / rate, multiple, int(wanted) / rate)

        dtype = self.unet.dtype
        audio = initial_noise((batch_size, self.unet.config.in_channels, length), generator, self.device, dtype)
        scheduler = self.scheduler.for_call()
        scheduler.set_timesteps(num_inference_steps, device=audio.device)
        scheduler.timesteps = scheduler.timesteps.to(dtype)
        for t in self.progress_bar(scheduler.timesteps):
            audio = scheduler.step(self.unet(audio, t).sample, t, audio).prev_sample
        audios = audio.clamp(-1, 1).float().cpu().numpy()[:, :, : int(wanted)]
        return AudioPipelineOutput(audios=audios) if return_dict else (audios,)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> Path:
    """Write audio in [-1, 1], shaped (channels, samples) or (samples,), as a 16-bit PCM WAV file.

    Values outside [-1, 1] are clipped. Returns the path written.
    """
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] < 1:
        raise ValueError(f"audio must be shaped (channels, samples) or (samples,), got {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("audio holds NaN or infinite values")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(pcm.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(np.ascontiguousarray(pcm.T).tobytes())
    return path
