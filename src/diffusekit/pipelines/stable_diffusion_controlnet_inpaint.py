"""StableDiffusionControlNetInpaintPipeline: repaint the masked part of an image following a prompt
and ControlNets (inpainting UNets with 9 input channels, or plain 4-channel ones)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .controlnet_common import prepare_controlnet_call
from .image_processing import image_size, mask_crop_region, overlay_inpainted, preprocess_images, preprocess_mask
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_controlnet import StableDiffusionControlNetBase
from .stable_diffusion_inpaint import InpaintingSteps
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, timesteps_for_strength, warmup_steps

__all__ = ["StableDiffusionControlNetInpaintPipeline"]


class StableDiffusionControlNetInpaintPipeline(InpaintingSteps, StableDiffusionControlNetBase):
    """Text- and ControlNet-guided inpainting. Components as
    :class:`~diffusekit.pipelines.stable_diffusion_controlnet.StableDiffusionControlNetPipeline`."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "control_image")

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Repaint the white part of ``mask_image`` in ``image`` following ``prompt`` and ``control_image``.

        ``image`` / ``mask_image`` / ``padding_mask_crop`` / ``strength`` as in
        :class:`StableDiffusionInpaintPipeline`, except that the size defaults to the image's own
        (rounded down to a multiple of the VAE scale factor). ``control_image`` and the ControlNet
        arguments as in :class:`StableDiffusionControlNetPipeline`; the control image is cropped
        and resized like ``image``.
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        guess_mode = self.begin_control(controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                        control_guidance_end)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        self.check_inpaint_inputs(image, mask_image, strength, padding_mask_crop, output_type)
        prompts = prompt_batch_size(prompt, prompt_embeds)
        batch_size = prompts * num_images_per_prompt
        device = self._execution_device

        # 1. crop box, text embeddings (negative half first with guidance), control images
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            height, width = self._default_size(image, height, width)
            crops_coords = mask_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        prompt_embeds, negative_prompt_embeds = self.unet_prompt_embeds(
            state, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)
        control_image = self.control_images(state, control_image, height, width, prompts, num_images_per_prompt,
                                            guess_mode, crops_coords=crops_coords, resize_mode=resize_mode)

        # 2. image and mask at the output size; the tail of the schedule that `strength` keeps
        init_image = preprocess_images(image, height, width, multiple=self.vae_scale_factor,
                                       latent_channels=self._latent_channels(), resize_mode=resize_mode,
                                       crops_coords=crops_coords).to(torch.float32)
        mask_condition = preprocess_mask(mask_image, height, width, self.vae_scale_factor, resize_mode, crops_coords)
        height, width = init_image.shape[-2:]
        scheduler = state.scheduler
        _, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device)
        timesteps, num_inference_steps = timesteps_for_strength(scheduler, num_inference_steps, strength)
        if num_inference_steps < 1:
            raise ValueError(f"strength={strength} leaves {num_inference_steps} of the denoising steps; "
                             "raise strength or num_inference_steps")

        # 3. starting latents, mask latents, the nets' steps
        blend = self.unet.config.in_channels == 4
        latents, noise, image_latents = self.prepare_latents(
            batch_size, self._latent_channels(), height, width, prompt_embeds.dtype, device, generator, latents,
            init_image, timesteps[:1].repeat(batch_size), is_strength_max=strength == 1.0,
            return_image_latents=blend, scheduler=scheduler)
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, self.masked_image(init_image, mask_condition, None), batch_size, height, width,
            prompt_embeds.dtype, device, generator, self.guided(state))
        self.check_unet_channels(mask, masked_image_latents)
        extra_step = step_kwargs(scheduler, generator, eta)
        control = prepare_controlnet_call(self.controlnet, control_image, len(timesteps),
                                          controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                          control_guidance_end)

        # 4. denoising loop
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                extra = None if blend else torch.cat([mask, masked_image_latents], dim=1)
                noise_pred = self.predict_controlled_noise(state, control, i, latents, t, prompt_embeds,
                                                           extra_channels=extra)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if blend:  # outside the mask: the image's latents at the next step's noise level
                    latents = self.keep_unmasked(state, latents, image_latents, noise, mask, timesteps, i)
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        control_image=control.images))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    negative_prompt_embeds = tensors["negative_prompt_embeds"]
                    control.images = tensors["control_image"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 5. decode, safety check, convert; with a crop, paste the result back into the image
        images, nsfw = self.latents_to_output(latents, output_type, generator, prompt_embeds.dtype)
        if padding_mask_crop is not None:
            images = [overlay_inpainted(mask_image, image, result, crops_coords) for result in images]
        return self._finish_call(images, nsfw, return_dict)

    def _default_size(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """``height`` / ``width``, by default the image's, rounded down to the VAE scale factor."""
        own_height, own_width = image_size(image)
        factor = self.vae_scale_factor
        return (height or own_height // factor * factor, width or own_width // factor * factor)
