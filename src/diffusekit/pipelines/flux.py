"""FluxPipeline: text-to-image with FLUX.1 (rectified flow, MMDiT transformer, CLIP + T5 text)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator, randn_tensor
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .flux_common import (
    FluxBase,
    default_sigmas,
    latent_image_ids,
    pack_latents,
    scheduler_shift,
)
from .noise import check_generators
from .prompt_encoding import prompt_batch_size
from .timesteps import progress_due, retrieve_timesteps, warmup_steps


class FluxPipeline(FluxBase):
    """Generate images from text with FLUX.1 [dev] (guidance-distilled) or [schnell] (timestep-distilled).

    Components as :class:`~diffusekit.pipelines.flux_common.FluxBase`.
    """

    _whole_step_loop = True  # the loop steps through denoising_step (pipe.compile(whole_step=True))

    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int,
                        dtype: torch.dtype, device, generator: Generator, latents: torch.Tensor | None = None):
        """``(packed noise or the given packed latents, their position ids)`` for a ``height`` x ``width`` image."""
        latent_h, latent_w = self.latent_size(height, width)
        image_ids = latent_image_ids(latent_h // 2, latent_w // 2, device, dtype)
        if latents is not None:
            return latents.to(device=device, dtype=dtype), image_ids
        check_generators(generator, batch_size)
        noise = randn_tensor((batch_size, num_channels_latents, latent_h, latent_w), generator=generator,
                             device=device, dtype=dtype)
        return pack_latents(noise), image_ids

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
    ):
        """Generate images for ``prompt`` (CLIP) and ``prompt_2`` (T5, default ``prompt``).

        - ``guidance_scale``: the distilled guidance fed to guidance-embedding transformers (FLUX.1
          [dev]); ignored by models without it ([schnell], which wants ``guidance_scale=0`` and ~4 steps).
        - ``true_cfg_scale`` > 1 with a ``negative_prompt`` (or negative embeddings): real
          classifier-free guidance, a second transformer call per step, ``neg + s * (cond - neg)``.
        - ``height`` / ``width`` (default 1024) are rounded down to multiples of 16 (VAE factor x 2x2 patches).
        - ``sigmas``: custom noise levels (default ``linspace(1, 1/N, N)``), shifted by the scheduler with
          ``mu`` from the image's token count.
        - ``latents``: packed starting noise (B, tokens, 64); ``output_type``: pil, np, pt or latent
          (packed latents); ``max_sequence_length``: T5 tokens (at most 512).
        - ``callback_on_step_end(pipe, step, t, tensors)`` gets the ``callback_on_step_end_tensor_inputs``
          (latents, prompt_embeds) and may return replacements.
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             true_cfg_scale=true_cfg_scale, num_images_per_prompt=num_images_per_prompt)
        height, width = self.default_height_width(height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs, max_sequence_length, output_type)
        state = self._begin_call(guidance_scale, joint_attention_kwargs, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs)
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        device = self._execution_device

        # 1. text: T5 token embeddings, CLIP pooled embedding (and the negative ones for true CFG)
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self.call_prompt_embeds(
            state, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, batch_size, device,
            num_images_per_prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            negative_pooled_prompt_embeds, max_sequence_length)

        # 2. packed noise, its position ids, and the schedule shifted for this many image tokens
        latents, image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt, self.transformer.config.in_channels // 4, height, width,
            prompt_embeds.dtype, device, generator, latents)
        scheduler = state.scheduler
        mu = scheduler_shift(scheduler, latents.shape[1])
        timesteps, num_inference_steps = retrieve_timesteps(
            scheduler, num_inference_steps, device, sigmas=default_sigmas(scheduler, num_inference_steps, sigmas), mu=mu)
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        guidance = self.guidance_vector(guidance_scale, latents.shape[0], device)

        # 3. denoising loop: Euler steps along the predicted velocity
        scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                state.current_timestep = t
                latents = self.denoising_step(state, latents, t, guidance, prompt_embeds, pooled_prompt_embeds,
                                              text_ids, image_ids, negative, true_cfg_scale)
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(latents=latents, prompt_embeds=prompt_embeds))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()
        state.current_timestep = None

        # 4. decode
        images = self.latents_to_output(latents, height, width, output_type)
        return self._finish_call(images, return_dict)
