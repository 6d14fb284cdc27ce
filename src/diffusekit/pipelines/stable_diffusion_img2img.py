"""StableDiffusionImg2ImgPipeline: text-guided image-to-image (SDEdit) with Stable Diffusion."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator, randn_tensor
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .image_processing import preprocess_images
from .noise import check_generators
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_common import StableDiffusionBase
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, timesteps_for_strength, warmup_steps
from .vae_codec import encode_images


class ImageToImageLatents:
    """The starting latents of image-to-image, shared by the SD and SDXL pipelines (which set
    ``_vae_force_upcast``: whether the VAE config's ``force_upcast`` applies to encoding)."""

    def prepare_latents(self, image: torch.Tensor, timestep: torch.Tensor, batch_size: int,
                        num_images_per_prompt: int, dtype: torch.dtype, device, generator: Generator = None,
                        scheduler=None, add_noise: bool = True):
        """Encode ``image`` (or take it as latents when it has the latent channel count), repeat it to
        the batch, and (with ``add_noise``) noise it to ``timestep`` with ``scheduler`` (default: the
        pipeline's); random draws in the reference's order."""
        image = image.to(device=device, dtype=dtype)
        batch_size = batch_size * num_images_per_prompt
        if image.shape[1] == self.vae.config.latent_channels:
            init_latents = image
        else:
            check_generators(generator, batch_size)
            if isinstance(generator, (list, tuple)):
                image = _repeat_to(image, batch_size, "image")
            init_latents = encode_images(self.vae, image, generator, force_upcast=self._vae_force_upcast,
                                         use_stats=self._vae_latent_stats)
        init_latents = _repeat_to(init_latents, batch_size, "image")
        if not add_noise:
            return init_latents
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return (scheduler or self.scheduler).add_noise(init_latents, noise, timestep)


class StableDiffusionImg2ImgPipeline(ImageToImageLatents, StableDiffusionBase):
    """Noise an input image part of the way (``strength``) and denoise it towards ``prompt``
    (SDEdit, Meng et al., 2021). Components as :class:`StableDiffusionPipeline`."""

    _whole_step_loop = True  # the loop steps through denoising_step (pipe.compile(whole_step=True))

    def noised_image_latents(self, scheduler, image, strength: float, num_inference_steps: int, batch_size: int,
                             num_images_per_prompt: int, dtype: torch.dtype, device, generator: Generator,
                             timesteps: list[int] | None = None, sigmas: list[float] | None = None):
        """``(latents, timesteps, steps left)``: ``scheduler``'s schedule tail for ``strength`` and
        ``image`` (preprocessed, encoded, repeated to the batch) noised to its first timestep."""
        image = preprocess_images(image, multiple=self.vae_scale_factor,
                                  latent_channels=self.vae.config.latent_channels)
        _, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        timesteps, num_inference_steps = timesteps_for_strength(scheduler, num_inference_steps, strength)
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)
        latents = self.prepare_latents(image, latent_timestep, batch_size, num_images_per_prompt, dtype, device,
                                       generator, scheduler)
        return latents, timesteps, num_inference_steps

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Transform ``image`` (PIL image, numpy array or tensor in [0, 1], or a list of them; a
        tensor with the VAE's latent channel count is taken as latents) following ``prompt``.

        ``strength`` in [0, 1]: how much of the schedule runs (1 ignores the image's content,
        0 returns it unchanged after a round trip through the VAE); ``int(num_inference_steps *
        strength)`` steps run. The other arguments are those of :class:`StableDiffusionPipeline`.
        """
        check_call_arguments(strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        if image is None:
            raise ValueError("image is required")
        state = self._begin_call(prompt, None, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, negative_prompt_embeds = self.unet_prompt_embeds(
            state, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. the image, the tail of the schedule, and the image noised to its first timestep
        scheduler = state.scheduler
        latents, timesteps, num_inference_steps = self.noised_image_latents(
            scheduler, image, strength, num_inference_steps, batch_size, num_images_per_prompt, prompt_embeds.dtype,
            device, generator, timesteps, sigmas)
        extra_step = step_kwargs(scheduler, generator, eta)
        timestep_cond = self.timestep_cond(guidance_scale, batch_size * num_images_per_prompt, device, latents.dtype)

        # 3. denoising loop
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                latents = self.denoising_step(state, latents, t, prompt_embeds, timestep_cond, extra_step)
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    negative_prompt_embeds = tensors["negative_prompt_embeds"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 4. decode, safety check, convert
        images, nsfw = self.latents_to_output(latents, output_type, generator, prompt_embeds.dtype)
        return self._finish_call(images, nsfw, return_dict)


def _repeat_to(batch: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """Repeat a batch to ``size`` items (``size`` must be a multiple of its length)."""
    if batch.shape[0] == size:
        return batch
    if batch.shape[0] > size or size % batch.shape[0]:
        raise ValueError(f"{name} holds {batch.shape[0]} images, which cannot be repeated to the "
                         f"{size} images asked for")
    return torch.cat([batch] * (size // batch.shape[0]), dim=0)
