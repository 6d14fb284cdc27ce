"""StableDiffusionXLControlNetPipeline: SDXL text-to-image guided by one or more ControlNets.

SDXL ControlNets (``addition_embed_type="text_time"``) take the same added conditioning as the
UNet (pooled text embedding and time ids); their residuals join the UNet's skips at every step
in the nets' guidance windows (see :mod:`~diffusekit.pipelines.controlnet_common`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import ADDED_COND, CallState, pipeline_call
from .controlnet_common import ControlNetCall, as_controlnet, prepare_controlnet_call
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_controlnet import StableDiffusionControlNetBase
from .stable_diffusion_xl_common import StableDiffusionXLBase
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, timesteps_until, warmup_steps

__all__ = ["StableDiffusionXLControlNetBase", "StableDiffusionXLControlNetPipeline"]


class StableDiffusionXLControlNetBase(StableDiffusionXLBase, StableDiffusionControlNetBase):
    """Components and per-step ControlNet work of the SDXL ControlNet pipelines (no ``__call__``).

    Components: those of :class:`~diffusekit.pipelines.stable_diffusion_xl_common.StableDiffusionXLBase`
    and ``controlnet``: a ControlNetModel, a list or tuple of them (made a MultiControlNetModel),
    or a MultiControlNetModel. The ControlNet steps are the SD ControlNet pipelines'
    (:class:`~diffusekit.pipelines.stable_diffusion_controlnet.StableDiffusionControlNetBase`), the
    nets taking the UNet's added conditioning too.
    """

    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "image")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None,
                 feature_extractor=None, image_encoder=None) -> None:
        StableDiffusionXLBase.__init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet,
                                       scheduler, image_encoder, feature_extractor, force_zeros_for_empty_prompt,
                                       add_watermarker)
        self.register_modules(controlnet=as_controlnet(controlnet))

    def predict_controlled_noise(self, state: CallState, control: ControlNetCall, step: int, latents: torch.Tensor,
                                 t, prompt_embeds: torch.Tensor, timestep_cond: torch.Tensor | None = None,
                                 extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """The nets' residuals of ``step`` (they read the call's added conditioning) into the call's
        ``denoiser_kwargs``, then the guided UNet prediction."""
        state.denoiser_kwargs.update(control.residuals(state.scheduler, step, latents, t, prompt_embeds,
                                                       guided=self.guided(state),
                                                       added_cond_kwargs=_text_time(state.denoiser_kwargs[ADDED_COND])))
        return self.predict_noise(state, latents, t, prompt_embeds, timestep_cond, extra_channels=extra_channels)

    def control_after_step(self, state: CallState, control: ControlNetCall, step: int, t, latents: torch.Tensor,
                           prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step callback (``image``: the control images); ``(latents, prompt_embeds)`` it returns."""
        tensors = self.after_step(state, step, t, dict(latents=latents, prompt_embeds=prompt_embeds,
                                                       image=control.images))
        control.images = tensors["image"]
        return tensors["latents"], tensors["prompt_embeds"]


def _first(images) -> torch.Tensor:
    return images[0] if isinstance(images, list) else images


class StableDiffusionXLControlNetPipeline(StableDiffusionXLControlNetBase):
    """Text-to-image with SDXL and ControlNets; components as :class:`StableDiffusionXLControlNetBase`."""

    _interleaved_time_ids = True

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Generate images from ``prompt`` following the control ``image``.

        ``image``: the control image (PIL image, array or tensor in [0, 1], or a batch: one per
        prompt); with several nets, a list of one per net. The output size defaults to the control
        image's (``height`` / ``width`` resize it). ``controlnet_conditioning_scale``: the nets'
        weights (one, or one per net); ``guess_mode``: the nets see only the conditional batch
        (forced by nets with ``global_pool_conditions``); ``control_guidance_start`` / ``_end``:
        the fraction of the steps each net runs over. The other arguments are those of
        :class:`~diffusekit.StableDiffusionXLPipeline` (no ``guidance_rescale``, as the reference).

        Returns :class:`~diffusekit.pipelines.stable_diffusion_xl_common.StableDiffusionXLPipelineOutput`
        (or ``(images,)``).
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        self.check_xl_prompts(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        guess_mode = self.begin_control(controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                        control_guidance_end)
        state.denoising_end = denoising_end
        prompts = prompt_batch_size(prompt, prompt_embeds)
        batch_size = prompts * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, pooled, negative_pooled = self.unet_text_inputs(
            state, prompt, prompt_2, device, num_images_per_prompt, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. control images: they set the output size
        images = self.control_images(state, image, height, width, prompts, num_images_per_prompt, guess_mode)
        height, width = _first(images).shape[-2:]

        # 3. schedule, starting noise, and which steps each net runs (over the whole schedule)
        scheduler = state.scheduler
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        state.num_timesteps = len(timesteps)
        latents = self.prepare_latents(batch_size, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents, scheduler)
        timestep_cond = self.timestep_cond(guidance_scale, batch_size, device, latents.dtype)
        extra_step = step_kwargs(scheduler, generator, eta)
        control = prepare_controlnet_call(self.controlnet, images, len(timesteps), controlnet_conditioning_scale,
                                          guess_mode, control_guidance_start, control_guidance_end)

        # 4. added conditioning: pooled text embedding and time ids
        time_ids, negative_time_ids = self.size_time_ids(
            height, width, self.projection_dim(pooled), prompt_embeds.dtype, original_size, crops_coords_top_left,
            target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size)
        self.added_conditioning(state, pooled, negative_pooled, time_ids, negative_time_ids, batch_size, device)

        # 5. denoising loop, up to denoising_end
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        timesteps, num_inference_steps = timesteps_until(scheduler, timesteps, num_inference_steps, denoising_end)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                noise_pred = self.predict_controlled_noise(state, control, i, latents, t, prompt_embeds, timestep_cond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if state.callback is not None:
                    latents, prompt_embeds = self.control_after_step(state, control, i, t, latents, prompt_embeds)
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 6. decode and convert
        images, _ = self.latents_to_output(latents, output_type, generator)
        return self._finish_call(images, None, return_dict)


def _text_time(added: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The added conditioning a ControlNet reads: pooled text and time ids (IP-Adapter image tokens are the UNet's)."""
    return {key: added[key] for key in ("text_embeds", "time_ids")}
