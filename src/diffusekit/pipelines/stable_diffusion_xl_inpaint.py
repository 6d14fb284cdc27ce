"""StableDiffusionXLInpaintPipeline: repaint the masked part of an image with SDXL (9-channel
inpainting UNets, or 4-channel ones with the latents outside the mask reset after every step)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .image_processing import mask_crop_region, overlay_inpainted, preprocess_images, preprocess_mask
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_inpaint import InpaintingSteps
from .stable_diffusion_xl_common import StableDiffusionXLBase
from .stable_diffusion_xl_img2img import RefinerConditioning, check_denoising_range, image_schedule
from .timesteps import progress_due, step_kwargs, timesteps_until, warmup_steps


class StableDiffusionXLInpaintPipeline(RefinerConditioning, InpaintingSteps, StableDiffusionXLBase):
    """Text-guided inpainting with SDXL; components and options as
    :class:`~diffusekit.StableDiffusionXLImg2ImgPipeline`."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                               "masked_image_latents")

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        """Repaint the white part of ``mask_image`` in ``image`` following ``prompt``.

        ``image`` / ``mask_image`` / ``masked_image_latents`` / ``padding_mask_crop`` as in
        :class:`~diffusekit.StableDiffusionInpaintPipeline` (``image`` may also be a base's latents,
        with ``denoising_start``); the SDXL arguments as in
        :class:`~diffusekit.StableDiffusionXLImg2ImgPipeline`.
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale, eta=eta)
        check_denoising_range(denoising_start, denoising_end)
        height, width = self.default_height_width(height, width)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        self.check_xl_prompts(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        state.denoising_start, state.denoising_end = denoising_start, denoising_end
        self.check_inpaint_inputs(image, mask_image, strength, padding_mask_crop, output_type)
        count = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, pooled, negative_pooled = self.unet_text_inputs(
            state, prompt, prompt_2, device, num_images_per_prompt, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. the schedule's tail (after denoising_start, or what strength keeps)
        scheduler = state.scheduler
        timesteps, num_inference_steps = image_schedule(scheduler, num_inference_steps, strength, denoising_start,
                                                        device, timesteps, sigmas)

        # 3. image, starting latents and mask
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = mask_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        init_image = preprocess_images(image, height, width, multiple=self.vae_scale_factor,
                                       latent_channels=self._latent_channels(), resize_mode=resize_mode,
                                       crops_coords=crops_coords).to(torch.float32)
        blend = self.unet.config.in_channels == 4
        latents, noise, image_latents = self.prepare_latents(
            count, self._latent_channels(), height, width, prompt_embeds.dtype, device, generator, latents,
            init_image, timesteps[:1].repeat(count), is_strength_max=strength == 1.0, return_image_latents=blend,
            scheduler=scheduler, add_noise=denoising_start is None)
        mask_condition = preprocess_mask(mask_image, height, width, self.vae_scale_factor, resize_mode, crops_coords)
        masked_image = self.masked_image(init_image, mask_condition, masked_image_latents)
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, masked_image, count, height, width, prompt_embeds.dtype, device, generator,
            self.guided(state))
        self.check_unet_channels(mask, masked_image_latents)
        extra_step = step_kwargs(scheduler, generator, eta)

        # 4. added conditioning: pooled text embedding and time ids (sizes or aesthetic score)
        time_ids, negative_time_ids = self.image_time_ids(
            *(size * self.vae_scale_factor for size in latents.shape[-2:]), self.projection_dim(pooled),
            prompt_embeds.dtype, original_size, crops_coords_top_left, target_size, aesthetic_score,
            negative_aesthetic_score, negative_original_size, negative_crops_coords_top_left, negative_target_size)
        self.added_conditioning(state, pooled, negative_pooled, time_ids, negative_time_ids, count, device)
        timestep_cond = self.timestep_cond(guidance_scale, count, device, latents.dtype)

        # 5. denoising loop, up to denoising_end
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        timesteps, num_inference_steps = timesteps_until(scheduler, timesteps, num_inference_steps, denoising_end)
        state.num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                extra = None if blend else torch.cat([mask, masked_image_latents], dim=1)
                noise_pred = self.predict_noise(state, latents, t, prompt_embeds, timestep_cond, extra_channels=extra)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if blend:  # outside the mask: the image's latents at the next step's noise level
                    latents = self.keep_unmasked(state, latents, image_latents, noise, mask, timesteps, i)
                if state.callback is not None:
                    tensors = self.after_step(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, mask=mask,
                        masked_image_latents=masked_image_latents))
                    latents, prompt_embeds, mask = tensors["latents"], tensors["prompt_embeds"], tensors["mask"]
                    masked_image_latents = tensors["masked_image_latents"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 6. decode and convert; with a crop, paste the result back into the image
        images, _ = self.latents_to_output(latents, output_type, generator)
        if padding_mask_crop is not None:
            images = [overlay_inpainted(mask_image, image, result, crops_coords) for result in images]
        return self._finish_call(images, None, return_dict)
