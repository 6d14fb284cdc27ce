"""StableDiffusionXLControlNetImg2ImgPipeline: SDXL image-to-image guided by one or more ControlNets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .controlnet_common import prepare_controlnet_call
from .image_processing import preprocess_images
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_img2img import ImageToImageLatents
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetBase, _first
from .stable_diffusion_xl_img2img import RefinerConditioning, image_schedule
from .timesteps import progress_due, step_kwargs, warmup_steps

__all__ = ["StableDiffusionXLControlNetImg2ImgPipeline"]


class StableDiffusionXLControlNetImg2ImgPipeline(RefinerConditioning, ImageToImageLatents,
                                                 StableDiffusionXLControlNetBase):
    """Noise an image part of the way and denoise it towards ``prompt`` with SDXL, following the
    control image(s). Components as
    :class:`~diffusekit.pipelines.stable_diffusion_xl_controlnet.StableDiffusionXLControlNetBase`;
    ``requires_aesthetics_score`` as :class:`~diffusekit.StableDiffusionXLImg2ImgPipeline`'s."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                 requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None, feature_extractor=None, image_encoder=None) -> None:
        StableDiffusionXLControlNetBase.__init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                                                 unet, controlnet, scheduler, force_zeros_for_empty_prompt,
                                                 add_watermarker, feature_extractor, image_encoder)
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
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
        """Transform ``image`` following ``prompt`` and the ``control_image`` (one per net with
        several nets). ``height`` / ``width`` resize both (default: their own sizes; the time ids
        take the control image's). ``strength``: how much of the schedule runs. The ControlNet
        arguments are those of :class:`~diffusekit.StableDiffusionXLControlNetPipeline`, the others
        those of :class:`~diffusekit.StableDiffusionXLImg2ImgPipeline`.
        """
        check_call_arguments(strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        if image is None:
            raise ValueError("image is required (the picture to transform; the nets read control_image)")
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        self.check_xl_prompts(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        guess_mode = self.begin_control(controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                        control_guidance_end)
        prompts = prompt_batch_size(prompt, prompt_embeds)
        count = prompts * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, pooled, negative_pooled = self.unet_text_inputs(
            state, prompt, prompt_2, device, num_images_per_prompt, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. the image and the control image(s), which set the size of the time ids
        image = preprocess_images(image, height, width, multiple=self.vae_scale_factor, latent_channels=4)
        images = self.control_images(state, control_image, height, width, prompts, num_images_per_prompt,
                                     guess_mode)
        height, width = _first(images).shape[-2:]

        # 3. the schedule's tail for strength, the image's latents noised to its start
        scheduler = state.scheduler
        timesteps, num_inference_steps = image_schedule(scheduler, num_inference_steps, strength, None, device)
        state.num_timesteps = len(timesteps)
        if latents is None:
            latents = self.prepare_latents(image, timesteps[:1].repeat(count), prompts, num_images_per_prompt,
                                           prompt_embeds.dtype, device, generator, scheduler)
        extra_step = step_kwargs(scheduler, generator, eta)
        control = prepare_controlnet_call(self.controlnet, images, len(timesteps), controlnet_conditioning_scale,
                                          guess_mode, control_guidance_start, control_guidance_end)

        # 4. added conditioning: pooled text embedding and time ids (sizes or aesthetic score)
        time_ids, negative_time_ids = self.image_time_ids(
            height, width, self.projection_dim(pooled), prompt_embeds.dtype, original_size, crops_coords_top_left,
            target_size, aesthetic_score, negative_aesthetic_score, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        self.added_conditioning(state, pooled, negative_pooled, time_ids, negative_time_ids, count, device)

        # 5. denoising loop (no guidance-scale embedding, as the reference)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                noise_pred = self.predict_controlled_noise(state, control, i, latents, t, prompt_embeds, None)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if state.callback is not None:
                    latents, prompt_embeds = self.control_after_step(state, control, i, t, latents, prompt_embeds)
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 6. decode and convert
        images, _ = self.latents_to_output(latents, output_type, generator)
        return self._finish_call(images, None, return_dict)
