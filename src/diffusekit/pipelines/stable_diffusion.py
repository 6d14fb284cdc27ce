"""StableDiffusionPipeline: text-to-image with a latent UNet, a KL VAE and a CLIP text encoder."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_common import StableDiffusionBase, StableDiffusionPipelineOutput
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, warmup_steps

__all__ = ["StableDiffusionPipeline", "StableDiffusionPipelineOutput"]


class StableDiffusionPipeline(StableDiffusionBase):
    """Text-to-image generation with Stable Diffusion (Rombach et al., 2022).

    Components: ``vae`` (AutoencoderKL), ``text_encoder`` (transformers CLIPTextModel), ``tokenizer``
    (CLIPTokenizer), ``unet`` (UNet2DConditionModel), ``scheduler``, ``safety_checker``
    (StableDiffusionSafetyChecker or None), ``feature_extractor`` (CLIPImageProcessor), and
    ``image_encoder`` (CLIPVisionModelWithProjection or None: IP-Adapter image prompts, see ``load_ip_adapter``).
    """

    _whole_step_loop = True  # the loop steps through denoising_step (pipe.compile(whole_step=True))

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Generate images from ``prompt``.

        ``guidance_scale`` > 1 turns on classifier-free guidance (against ``negative_prompt``, or
        the empty prompt); ``guidance_rescale`` rescales the guided prediction (Lin et al., 2023).
        ``timesteps`` / ``sigmas``: a custom schedule, for schedulers that take one. ``eta`` goes
        to schedulers whose ``step`` takes it (DDIM). ``clip_skip`` = k uses the text encoder's
        k-th layer from the end. ``callback_on_step_end(pipe, step, t, tensors)`` receives the
        tensors named in ``callback_on_step_end_tensor_inputs`` and may return replacements.
        ``prompt_weighting="a1111"`` reads ``(word:1.3)`` / ``(word)`` / ``[word]`` weights and
        allows prompts longer than 75 tokens (see :mod:`~diffusekit.pipelines.prompt_encoding`).
        ``ip_adapter_image`` (one per loaded IP-Adapter) or ``ip_adapter_image_embeds`` (a list of
        tensors, negative half first with guidance): the image prompt (see ``load_ip_adapter``).
        ``output_type``: "pil", "np", "pt" or "latent".

        Returns :class:`StableDiffusionPipelineOutput` (or ``(images, nsfw_content_detected)``).
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale, eta=eta)
        height, width = self.default_height_width(height, width)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, guidance_rescale, clip_skip,
                                 cross_attention_kwargs)
        batch_size = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, negative_prompt_embeds = self.unet_prompt_embeds(
            state, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. schedule and starting noise
        scheduler = state.scheduler
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(batch_size, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents, scheduler)
        extra_step = step_kwargs(scheduler, generator, eta)
        timestep_cond = self.timestep_cond(guidance_scale, batch_size, device, latents.dtype)

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
