"""FluxImg2ImgPipeline: text-guided image-to-image with FLUX.1 (SDEdit on a rectified flow)."""

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
from .image_processing import preprocess_images
from .noise import check_generators
from .prompt_encoding import prompt_batch_size
from .timesteps import progress_due, retrieve_timesteps, warmup_steps
from .vae_codec import encode_images


class FluxImg2ImgPipeline(FluxBase):
    """Noise an image part of the way to pure noise (``strength``) and let FLUX.1 bring it back
    following the prompt. Components as :class:`~diffusekit.pipelines.flux_common.FluxBase`."""

    def get_timesteps(self, num_inference_steps: int, strength: float,
                      scheduler=None) -> tuple[torch.Tensor, int]:
        """The last ``num_inference_steps * strength`` steps of ``scheduler``'s schedule (default: the
        pipeline's; the reference rounds ``steps - steps * strength`` down, so e.g. 2 steps at strength
        0.6 both run)."""
        scheduler = scheduler or self.scheduler
        start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        timesteps = scheduler.timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        return timesteps, num_inference_steps - start

    def encode_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Images in [-1, 1] to shifted and scaled latents; with a list of generators, image i uses generator i."""
        if isinstance(generator, (list, tuple)):
            generator = list(generator)[: image.shape[0]]
        return encode_images(self.vae, image, generator, shift_factor=self.vae.config.shift_factor or 0.0)

    def prepare_latents(self, image: torch.Tensor, timestep: torch.Tensor, batch_size: int, num_channels_latents: int,
                        height: int, width: int, dtype: torch.dtype, device, generator: Generator,
                        latents: torch.Tensor | None = None, scheduler=None):
        """``(packed latents, position ids)``: the image's latents (encoded unless it already has the
        VAE's latent channels) repeated to the batch and noised to ``timestep`` by ``scheduler``
        (default: the pipeline's), or the given ``latents``."""
        check_generators(generator, batch_size)
        latent_h, latent_w = self.latent_size(height, width)
        image_ids = latent_image_ids(latent_h // 2, latent_w // 2, device, dtype)
        if latents is not None:
            return latents.to(device=device, dtype=dtype), image_ids
        image = image.to(device=device, dtype=dtype)
        image_latents = image if image.shape[1] == self.latent_channels else self.encode_image(image, generator)
        if batch_size > image_latents.shape[0]:
            if batch_size % image_latents.shape[0]:
                raise ValueError(f"image holds {image_latents.shape[0]} images, which cannot be repeated to the "
                                 f"{batch_size} images asked for")
            image_latents = torch.cat([image_latents] * (batch_size // image_latents.shape[0]), dim=0)
        noise = randn_tensor((batch_size, num_channels_latents, latent_h, latent_w), generator=generator,
                             device=device, dtype=dtype)
        return pack_latents((scheduler or self.scheduler).scale_noise(image_latents, timestep, noise)), image_ids

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
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
        """Transform ``image`` (PIL image, numpy array or tensor in [0, 1], or a list; a tensor with the
        VAE's latent channels is taken as latents) towards ``prompt``.

        The image is resized to ``height`` x ``width`` (default 1024, rounded down to multiples of 16).
        ``strength`` in [0, 1]: the share of the schedule that runs (1 ignores the image). Other
        arguments as :meth:`FluxPipeline.__call__`.
        """
        if image is None:
            raise ValueError("image is required")
        check_call_arguments(strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             true_cfg_scale=true_cfg_scale, num_images_per_prompt=num_images_per_prompt)
        height, width = self.default_height_width(height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs, max_sequence_length, output_type)
        state = self._begin_call(guidance_scale, joint_attention_kwargs, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs)
        image = preprocess_images(image, height, width, multiple=self.vae_scale_factor * 2,
                                  latent_channels=self.latent_channels).to(torch.float32)
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        device = self._execution_device

        # 1. text: T5 token embeddings, CLIP pooled embedding (and the negative ones for true CFG)
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self.call_prompt_embeds(
            state, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, batch_size, device,
            num_images_per_prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            negative_pooled_prompt_embeds, max_sequence_length)

        # 2. the shifted schedule, its tail for this strength, and the image noised to its first step
        latent_h, latent_w = self.latent_size(height, width)
        scheduler = state.scheduler
        mu = scheduler_shift(scheduler, (latent_h // 2) * (latent_w // 2))
        _, num_inference_steps = retrieve_timesteps(
            scheduler, num_inference_steps, device, sigmas=default_sigmas(scheduler, num_inference_steps, sigmas), mu=mu)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, scheduler)
        if num_inference_steps < 1:
            raise ValueError(f"strength {strength} leaves {num_inference_steps} denoising steps; raise strength or "
                             "num_inference_steps")
        latents, image_ids = self.prepare_latents(
            image, timesteps[:1].repeat(batch_size * num_images_per_prompt), batch_size * num_images_per_prompt,
            self.transformer.config.in_channels // 4, height, width, prompt_embeds.dtype, device, generator, latents,
            scheduler)
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        guidance = self.guidance_vector(guidance_scale, latents.shape[0], device)

        # 3. denoising loop: Euler steps along the predicted velocity
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                state.current_timestep = t
                velocity = self.guided_velocity(state, latents, t, guidance, prompt_embeds, pooled_prompt_embeds,
                                                text_ids, image_ids, negative, true_cfg_scale)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(latents=latents, prompt_embeds=prompt_embeds))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()
        state.current_timestep = None

        # 4. decode
        images = self.latents_to_output(latents, height, width, output_type)
        return self._finish_call(images, return_dict)
