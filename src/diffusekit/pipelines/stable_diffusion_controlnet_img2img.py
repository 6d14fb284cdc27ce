"""StableDiffusionControlNetImg2ImgPipeline: image-to-image (SDEdit) guided by ControlNets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .controlnet_common import prepare_controlnet_call
from .image_processing import preprocess_images
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_controlnet import StableDiffusionControlNetBase
from .stable_diffusion_img2img import ImageToImageLatents
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, timesteps_for_strength, warmup_steps

__all__ = ["StableDiffusionControlNetImg2ImgPipeline"]


class StableDiffusionControlNetImg2ImgPipeline(ImageToImageLatents, StableDiffusionControlNetBase):
    """Noise ``image`` part of the way (``strength``) and denoise it towards ``prompt`` following
    the ControlNets' ``control_image``. Components as
    :class:`~diffusekit.pipelines.stable_diffusion_controlnet.StableDiffusionControlNetPipeline`."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "control_image")

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Transform ``image`` following ``prompt`` and the ControlNets' ``control_image``.

        ``image``: as in :class:`StableDiffusionImg2ImgPipeline` (a tensor with the VAE's latent
        channel count is taken as latents). ``control_image``: as ``image`` of
        :class:`StableDiffusionControlNetPipeline` (one entry per net with several). Both are
        resized to ``height`` x ``width`` when given (default: their own size). ``latents``: the
        starting latents, replacing the noised image. ``strength`` and the ControlNet arguments as
        in the image-to-image and ControlNet text-to-image pipelines.
        """
        check_call_arguments(strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        if image is None:
            raise ValueError("image is required")
        guess_mode = self.begin_control(controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                        control_guidance_end)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        prompts = prompt_batch_size(prompt, prompt_embeds)
        device = self._execution_device

        # 1. text embeddings (negative half first with guidance), the image and the control images
        prompt_embeds, negative_prompt_embeds = self.unet_prompt_embeds(
            state, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)
        image = preprocess_images(image, height, width, multiple=self.vae_scale_factor,
                                  latent_channels=self.vae.config.latent_channels).to(torch.float32)
        control_image = self.control_images(state, control_image, height, width, prompts, num_images_per_prompt,
                                            guess_mode)

        # 2. the tail of the schedule, the image noised to its first timestep, the nets' steps
        scheduler = state.scheduler
        _, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device)
        timesteps, num_inference_steps = timesteps_for_strength(scheduler, num_inference_steps, strength)
        if latents is None:
            latent_timestep = timesteps[:1].repeat(prompts * num_images_per_prompt)
            latents = self.prepare_latents(image, latent_timestep, prompts, num_images_per_prompt,
                                           prompt_embeds.dtype, device, generator, scheduler)
        extra_step = step_kwargs(scheduler, generator, eta)
        control = prepare_controlnet_call(self.controlnet, control_image, len(timesteps),
                                          controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                          control_guidance_end)

        # 3. denoising loop
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                noise_pred = self.predict_controlled_noise(state, control, i, latents, t, prompt_embeds)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        control_image=control.images))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    negative_prompt_embeds = tensors["negative_prompt_embeds"]
                    control.images = tensors["control_image"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 4. decode, safety check, convert
        images, nsfw = self.latents_to_output(latents, output_type, generator, prompt_embeds.dtype)
        return self._finish_call(images, nsfw, return_dict)
