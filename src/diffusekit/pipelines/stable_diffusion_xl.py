"""StableDiffusionXLPipeline: text-to-image with SDXL (Podell et al., 2023)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_xl_common import StableDiffusionXLBase, StableDiffusionXLPipelineOutput
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, timesteps_until, warmup_steps

__all__ = ["StableDiffusionXLPipeline", "StableDiffusionXLPipelineOutput"]


class StableDiffusionXLPipeline(StableDiffusionXLBase):
    """Text-to-image generation with Stable Diffusion XL; components as
    :class:`~diffusekit.pipelines.stable_diffusion_xl_common.StableDiffusionXLBase`."""

    _whole_step_loop = True  # the loop steps through denoising_step (pipe.compile(whole_step=True))

    _interleaved_time_ids = True

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
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
        guidance_rescale: float = 0.0,
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
        """Generate images from ``prompt`` (and ``prompt_2`` for the second text encoder).

        Micro-conditioning: ``original_size`` / ``target_size`` (default: the output size) and
        ``crops_coords_top_left``; the ``negative_*`` ones condition the unconditional branch (used
        only when both sizes are given). ``denoising_end`` in (0, 1): stop after that fraction of the
        schedule (with ``output_type="latent"``, hand the latents to a refiner's ``denoising_start``).
        The other arguments are those of :class:`~diffusekit.StableDiffusionPipeline`.

        Returns :class:`StableDiffusionXLPipelineOutput` (or ``(images,)``).
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale, eta=eta)
        height, width = self.default_height_width(height, width)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        self.check_xl_prompts(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        state.denoising_end = denoising_end
        batch_size = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, pooled, negative_pooled = self.unet_text_inputs(
            state, prompt, prompt_2, device, num_images_per_prompt, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. schedule and starting noise
        scheduler = state.scheduler
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(batch_size, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents, scheduler)
        extra_step = step_kwargs(scheduler, generator, eta)

        # 3. added conditioning: pooled text embedding and time ids
        time_ids, negative_time_ids = self.size_time_ids(
            height, width, self.projection_dim(pooled), prompt_embeds.dtype, original_size, crops_coords_top_left,
            target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size)
        self.added_conditioning(state, pooled, negative_pooled, time_ids, negative_time_ids, batch_size, device)
        timestep_cond = self.timestep_cond(guidance_scale, batch_size, device, latents.dtype)

        # 4. denoising loop, up to denoising_end
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        timesteps, num_inference_steps = timesteps_until(scheduler, timesteps, num_inference_steps, denoising_end)
        state.num_timesteps = len(timesteps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                latents = self.denoising_step(state, latents, t, prompt_embeds, timestep_cond, extra_step)
                if state.callback is not None:
                    tensors = self.after_step(state, i, t, dict(latents=latents, prompt_embeds=prompt_embeds))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 5. decode and convert
        images, _ = self.latents_to_output(latents, output_type, generator)
        return self._finish_call(images, None, return_dict)
