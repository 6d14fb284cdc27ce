"""StableDiffusionXLImg2ImgPipeline: SDXL image-to-image, and the SDXL refiner."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .image_processing import preprocess_images
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_img2img import ImageToImageLatents
from .stable_diffusion_xl_common import StableDiffusionXLBase
from .timesteps import (
    is_denoising_fraction, progress_due, retrieve_timesteps, step_kwargs, timesteps_for_strength, timesteps_from,
    timesteps_until, warmup_steps,
)


def check_denoising_range(denoising_start: float | None, denoising_end: float | None) -> None:
    """``denoising_start`` must come before ``denoising_end`` when both are in effect."""
    if is_denoising_fraction(denoising_start) and is_denoising_fraction(denoising_end) \
            and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be smaller than denoising_end ({denoising_end})")


def image_schedule(scheduler, num_inference_steps: int, strength: float, denoising_start: float | None, device,
                   timesteps: list[int] | None = None, sigmas: list[float] | None = None):
    """``(timesteps, steps left)`` of SDXL image-to-image and inpainting: the tail after
    ``denoising_start`` when it is in effect (a refiner), else the tail that ``strength`` keeps;
    ValueError when no step is left."""
    _, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    if is_denoising_fraction(denoising_start):
        timesteps, num_inference_steps = timesteps_from(scheduler, denoising_start)
    else:
        timesteps, num_inference_steps = timesteps_for_strength(scheduler, num_inference_steps, strength)
    if num_inference_steps < 1:
        raise ValueError(f"strength={strength} (denoising_start={denoising_start}) leaves {num_inference_steps} of "
                         "the denoising steps; raise strength or num_inference_steps")
    return timesteps, num_inference_steps


class RefinerConditioning:
    """Time ids of the SDXL img2img and inpainting pipelines: sizes, or with
    ``requires_aesthetics_score`` (the refiner) sizes and an aesthetic score."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, requires_aesthetics_score: bool = False,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None) -> None:
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def image_time_ids(self, height: int, width: int, projection_dim: int, dtype: torch.dtype, original_size,
                       crops_coords_top_left, target_size, aesthetic_score: float, negative_aesthetic_score: float,
                       negative_original_size, negative_crops_coords_top_left, negative_target_size):
        """``(time ids, negative time ids)``, one row each; sizes default to ``height`` x ``width``.
        Without the aesthetic score the negative row keeps the positive crop corner (as the reference)."""
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        negative_original_size = negative_original_size or original_size
        negative_target_size = negative_target_size or target_size
        if self.config.requires_aesthetics_score:
            values = (*original_size, *crops_coords_top_left, aesthetic_score)
            negative = (*negative_original_size, *negative_crops_coords_top_left, negative_aesthetic_score)
        else:
            values = (*original_size, *crops_coords_top_left, *target_size)
            negative = (*negative_original_size, *crops_coords_top_left, *negative_target_size)
        return self.time_ids(values, projection_dim, dtype), self.time_ids(negative, projection_dim, dtype)


class StableDiffusionXLImg2ImgPipeline(RefinerConditioning, ImageToImageLatents, StableDiffusionXLBase):
    """Noise an image part of the way and denoise it towards ``prompt`` with SDXL; also the refiner
    (``requires_aesthetics_score=True``, only ``text_encoder_2``), which takes the base's latents
    with ``denoising_start``. Components as
    :class:`~diffusekit.pipelines.stable_diffusion_xl_common.StableDiffusionXLBase`."""

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Transform ``image`` (PIL image, array or tensor in [0, 1], or latents with 4 channels,
        such as the base's ``output_type="latent"`` images) following ``prompt``.

        ``strength``: how much of the schedule runs; ``denoising_start`` in (0, 1) overrides it: the
        schedule starts after that fraction and ``image`` is taken as partly denoised latents (no
        noise added). ``aesthetic_score`` / ``negative_aesthetic_score`` condition a refiner UNet
        (``requires_aesthetics_score``). ``latents``: the starting latents, used as they are. The
        other arguments are those of :class:`~diffusekit.StableDiffusionXLPipeline`.
        """
        check_call_arguments(strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale, eta=eta)
        if image is None:
            raise ValueError("image is required")
        check_denoising_range(denoising_start, denoising_end)
        state = self._begin_call(prompt, None, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        self.check_xl_prompts(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        state.denoising_start, state.denoising_end = denoising_start, denoising_end
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        count = batch_size * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, pooled, negative_pooled = self.unet_text_inputs(
            state, prompt, prompt_2, device, num_images_per_prompt, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. the schedule's tail and the image's latents (noised unless a refiner takes over)
        scheduler = state.scheduler
        image = preprocess_images(image, multiple=self.vae_scale_factor, latent_channels=4)
        timesteps, num_inference_steps = image_schedule(scheduler, num_inference_steps, strength, denoising_start,
                                                        device, timesteps, sigmas)
        if latents is None:
            latents = self.prepare_latents(image, timesteps[:1].repeat(count), batch_size, num_images_per_prompt,
                                           prompt_embeds.dtype, device, generator, scheduler,
                                           add_noise=denoising_start is None)
        extra_step = step_kwargs(scheduler, generator, eta)

        # 3. added conditioning: pooled text embedding and time ids (sizes or aesthetic score)
        height, width = (size * self.vae_scale_factor for size in latents.shape[-2:])
        time_ids, negative_time_ids = self.image_time_ids(
            height, width, self.projection_dim(pooled), prompt_embeds.dtype, original_size, crops_coords_top_left,
            target_size, aesthetic_score, negative_aesthetic_score, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        self.added_conditioning(state, pooled, negative_pooled, time_ids, negative_time_ids, count, device)
        timestep_cond = self.timestep_cond(guidance_scale, count, device, latents.dtype)

        # 4. denoising loop, up to denoising_end
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        timesteps, num_inference_steps = timesteps_until(scheduler, timesteps, num_inference_steps, denoising_end)
        state.num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                noise_pred = self.predict_noise(state, latents, t, prompt_embeds, timestep_cond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if state.callback is not None:
                    tensors = self.after_step(state, i, t, dict(latents=latents, prompt_embeds=prompt_embeds))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 5. decode and convert
        images, _ = self.latents_to_output(latents, output_type, generator)
        return self._finish_call(images, None, return_dict)
