"""StableDiffusionControlNetPipeline: text-to-image guided by one or several ControlNets
(a conditioning image per net: edges, depth, pose...)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import CallState, pipeline_call
from .controlnet_common import (
    ControlNetCall, as_controlnet, check_controlnet_arguments, prepare_control_images, prepare_controlnet_call,
    resolve_guess_mode,
)
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_common import StableDiffusionBase, StableDiffusionPipelineOutput
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, warmup_steps

__all__ = ["StableDiffusionControlNetBase", "StableDiffusionControlNetPipeline", "StableDiffusionPipelineOutput"]


class StableDiffusionControlNetBase(StableDiffusionBase):
    """The Stable Diffusion components plus ``controlnet`` (a ControlNetModel, a MultiControlNetModel,
    or a list of nets, which becomes one), and the ControlNet steps of the three SD ControlNet pipelines."""

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True) -> None:
        if controlnet is None:
            raise ValueError(f"{type(self).__name__} needs a controlnet (a ControlNetModel, a list of them or a "
                             "MultiControlNetModel); from_single_file takes it as controlnet=")
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        self.register_modules(controlnet=as_controlnet(controlnet))

    def begin_control(self, controlnet_conditioning_scale, guess_mode: bool, control_guidance_start,
                      control_guidance_end) -> bool:
        """Check the ControlNet arguments before any work; the call's guess mode (forced on by
        ``global_pool_conditions``)."""
        check_controlnet_arguments(self.controlnet, controlnet_conditioning_scale, control_guidance_start,
                                   control_guidance_end)
        return resolve_guess_mode(self.controlnet, guess_mode)

    def control_images(self, state: CallState, image, height: int | None, width: int | None, prompt_batch: int,
                       num_images_per_prompt: int, guess_mode: bool, **options: Any):
        """The control image(s) at ``height`` x ``width`` (default: their own size), batched for the
        call (see :func:`~diffusekit.pipelines.controlnet_common.prepare_control_images`)."""
        return prepare_control_images(
            self.controlnet, image, width=width, height=height, batch_size=prompt_batch * num_images_per_prompt,
            num_images_per_prompt=num_images_per_prompt, device=self._execution_device,
            do_classifier_free_guidance=self.guided(state), guess_mode=guess_mode, prompt_batch=prompt_batch,
            vae_scale_factor=self.vae_scale_factor, **options)

    def predict_controlled_noise(self, state: CallState, control: ControlNetCall, step: int, latents: torch.Tensor,
                                 t, prompt_embeds: torch.Tensor, timestep_cond: torch.Tensor | None = None,
                                 extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`predict_noise` with the step's ControlNet residuals in the call's ``denoiser_kwargs``."""
        state.denoiser_kwargs.update(control.residuals(state.scheduler, step, latents, t, prompt_embeds,
                                                       self.guided(state)))
        return self.predict_noise(state, latents, t, prompt_embeds, timestep_cond, extra_channels=extra_channels)


class StableDiffusionControlNetPipeline(StableDiffusionControlNetBase):
    """Text-to-image with Stable Diffusion and ControlNet (Zhang et al., 2023). Components as
    :class:`~diffusekit.pipelines.stable_diffusion.StableDiffusionPipeline` plus ``controlnet``."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "image")

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Generate images from ``prompt`` following the control ``image``.

        ``image``: the conditioning image (PIL, numpy array or tensor in [0, 1], or a batch of one per
        prompt); with several ControlNets, a list with one entry per net (or, per prompt, a list of
        one image per net). The output has the control image's size unless ``height`` / ``width``
        resize it. ``controlnet_conditioning_scale``: the residuals' weight (one number, or one per
        net). ``guess_mode``: the nets see only the conditional branch, with residuals ramped from
        0.1 to 1 (for prompt-free use; a ``guidance_scale`` of 3-5 is advised).
        ``control_guidance_start`` / ``end``: the share of the steps (one value or one per net) in
        which each net runs. The other arguments are those of :class:`StableDiffusionPipeline`.

        Returns :class:`StableDiffusionPipelineOutput` (or ``(images, nsfw_content_detected)``).
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        guess_mode = self.begin_control(controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                        control_guidance_end)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        prompts = prompt_batch_size(prompt, prompt_embeds)
        batch_size = prompts * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings (negative half first with guidance) and the control images
        prompt_embeds, negative_prompt_embeds = self.unet_prompt_embeds(
            state, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)
        image = self.control_images(state, image, height, width, prompts, num_images_per_prompt, guess_mode,
                                    per_prompt_lists=True)
        height, width = (image[0] if isinstance(image, list) else image).shape[-2:]

        # 2. schedule, starting noise, and the steps each net runs in
        scheduler = state.scheduler
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(batch_size, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents, scheduler)
        extra_step = step_kwargs(scheduler, generator, eta)
        timestep_cond = self.timestep_cond(guidance_scale, batch_size, device, latents.dtype)
        control = prepare_controlnet_call(self.controlnet, image, len(timesteps), controlnet_conditioning_scale,
                                          guess_mode, control_guidance_start, control_guidance_end)

        # 3. denoising loop
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                noise_pred = self.predict_controlled_noise(state, control, i, latents, t, prompt_embeds,
                                                           timestep_cond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        image=control.images))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    negative_prompt_embeds, control.images = tensors["negative_prompt_embeds"], tensors["image"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 4. decode, safety check, convert
        images, nsfw = self.latents_to_output(latents, output_type, generator, prompt_embeds.dtype)
        return self._finish_call(images, nsfw, return_dict)
