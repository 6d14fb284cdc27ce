"""FluxControlPipeline: FLUX.1 Canny/Depth [dev] (channel-concatenated control).

The control image is VAE-encoded, packed like the latents and concatenated to them on the channel
axis at every step, so the transformer takes twice the latent channels (``in_channels`` 128 for
FLUX.1). A plain FLUX.1 transformer becomes one by loading a control LoRA, which widens its
``x_embedder`` (see :mod:`~diffusekit.loaders.lora_flux`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .flux import FluxPipeline
from .flux_common import default_sigmas, pack_latents, scheduler_shift
from .image_processing import preprocess_images
from .prompt_encoding import prompt_batch_size
from .timesteps import progress_due, retrieve_timesteps, warmup_steps
from .vae_codec import encode_images


class FluxControlImageMixin:
    """Control images of the FLUX control pipelines (preprocessing, batching, VAE encoding and packing) and
    their schedule."""

    def prepare_image(self, image, width: int, height: int, batch_size: int, num_images_per_prompt: int, device,
                      dtype: torch.dtype) -> torch.Tensor:
        """``image`` as a batch of ``batch_size`` (a single image is repeated, several are each repeated
        ``num_images_per_prompt`` times). PIL images and arrays are resized to ``height`` x ``width``
        and scaled to [-1, 1]; tensors are taken as they are (as the reference does)."""
        if image is None:
            raise ValueError("control_image is required")
        if not isinstance(image, torch.Tensor):
            image = preprocess_images(image, height, width, multiple=self.vae_scale_factor * 2, latent_channels=None)
        repeat = batch_size if image.shape[0] == 1 else num_images_per_prompt
        return image.repeat_interleave(repeat, dim=0).to(device=device, dtype=dtype)

    def encode_control_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Packed VAE latents of a [-1, 1] image batch (sampled with ``generator``, shifted and scaled)."""
        latents = encode_images(self.vae, image, generator, shift_factor=self.vae.config.shift_factor or 0.0)
        return pack_latents(latents)

    def shifted_schedule(self, state, num_inference_steps: int, sigmas: Sequence[float] | None, image_seq_len: int,
                         device) -> tuple[torch.Tensor, int, int]:
        """``(timesteps, steps, warmup steps)`` of the call's scheduler, shifted for ``image_seq_len`` tokens."""
        scheduler = state.scheduler
        timesteps, num_inference_steps = retrieve_timesteps(
            scheduler, num_inference_steps, device, sigmas=default_sigmas(scheduler, num_inference_steps, sigmas),
            mu=scheduler_shift(scheduler, image_seq_len))
        state.num_timesteps = len(timesteps)
        return timesteps, num_inference_steps, warmup_steps(timesteps, num_inference_steps, scheduler)


class FluxControlPipeline(FluxControlImageMixin, FluxPipeline):
    """Generate images from text following a control image (edges, depth) with a FLUX.1 transformer
    that takes the control latents next to its own. Components as
    :class:`~diffusekit.pipelines.flux_common.FluxBase`."""

    def _check_control_transformer(self) -> None:
        expected = 8 * self.latent_channels  # packed latents and packed control latents
        if self.transformer.config.in_channels != expected:
            raise ValueError(f"FluxControlPipeline needs a transformer with in_channels {expected} (latents and control "
                             f"latents), got {self.transformer.config.in_channels}; use FLUX.1 Canny/Depth [dev] or "
                             "load a control LoRA")

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        control_image=None,
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
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
    ):
        """Generate images for ``prompt`` that follow ``control_image`` (a PIL image, array or [-1, 1]
        tensor (N, 3, H, W), resized to ``height`` x ``width``; a 3-D tensor is taken as packed control
        latents). Other arguments as :meth:`FluxPipeline.__call__` (no true CFG here, as in the reference).
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt)
        self._check_control_transformer()
        height, width = self.default_height_width(height, width)
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length, output_type=output_type)
        state = self._begin_call(guidance_scale, joint_attention_kwargs, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs)
        batch = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 1. text, then the control latents (drawn before the noise, as the reference)
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
            max_sequence_length, state.lora_scale)
        control_image = self.prepare_image(control_image, width, height, batch, num_images_per_prompt, device,
                                           self.vae.dtype)
        if control_image.ndim == 4:
            control_image = self.encode_control_image(control_image, generator)

        # 2. packed noise with half the transformer's input channels, and the shifted schedule
        latents, image_ids = self.prepare_latents(batch, self.transformer.config.in_channels // 8, height, width,
                                                  prompt_embeds.dtype, device, generator, latents)
        scheduler = state.scheduler
        timesteps, num_inference_steps, warmup = self.shifted_schedule(state, num_inference_steps, sigmas,
                                                                       latents.shape[1], device)
        guidance = self.guidance_vector(guidance_scale, latents.shape[0], device)

        # 3. denoising loop on [latents, control latents]
        scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                state.current_timestep = t
                velocity = self.guided_velocity(state, torch.cat([latents, control_image], dim=2), t, guidance,
                                                prompt_embeds, pooled_prompt_embeds, text_ids, image_ids)
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
