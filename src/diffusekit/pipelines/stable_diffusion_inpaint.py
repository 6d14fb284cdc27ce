"""StableDiffusionInpaintPipeline: repaint the masked part of an image following a prompt.

Works with inpainting UNets (9 input channels: latents, the mask and the masked image's latents)
and with plain 4-channel UNets, whose latents outside the mask are reset after every step to the
image's latents noised to the next timestep.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..image_processor import VaeImageProcessor, mask_image_processor
from ..utils import Generator, randn_tensor
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .image_processing import (
    image_size, mask_crop_region, mask_size, overlay_inpainted, preprocess_images, preprocess_mask,
)
from .noise import check_generators
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_common import StableDiffusionBase
from .stable_diffusion_img2img import _repeat_to
from .timesteps import progress_due, retrieve_timesteps, step_kwargs, timesteps_for_strength, warmup_steps
from .vae_codec import encode_images


def _first_generators(generator: Generator, count: int) -> Generator:
    """As the reference encodes an image batch: image i uses generator i (extra generators unused)."""
    return generator[:count] if isinstance(generator, (list, tuple)) else generator


class InpaintingSteps:
    """The latents, mask and checks of inpainting, shared by the SD and SDXL pipelines (which set
    ``_vae_force_upcast``: whether the VAE config's ``force_upcast`` applies to encoding)."""

    @functools.cached_property
    def mask_processor(self) -> VaeImageProcessor:
        """Masks as the pipeline prepares them (grayscale, binarised, not normalised)."""
        return mask_image_processor(self.vae_scale_factor)

    def _latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def _encode(self, images: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Pixels to scaled latents; a tensor that already has the latent channel count is kept."""
        if images.shape[1] == self._latent_channels():
            return images
        return encode_images(self.vae, images, _first_generators(generator, images.shape[0]),
                             force_upcast=self._vae_force_upcast)

    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int,
                        dtype: torch.dtype, device, generator: Generator, latents: torch.Tensor | None = None,
                        image: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                        is_strength_max: bool = True, return_image_latents: bool = False, scheduler=None,
                        add_noise: bool = True):
        """``(latents, noise, image latents or None)``.

        At full strength the latents are pure noise (times ``init_noise_sigma``); below it, the
        image's latents noised to ``timestep``. Given ``latents`` are taken as the noise. Without
        ``add_noise`` (an SDXL refiner taking over the base's latents) the latents are the image's
        and the noise (for the 4-channel blend) is drawn fresh. ``scheduler``: the call's scheduler
        (default: the pipeline's).
        """
        scheduler = scheduler or self.scheduler
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        check_generators(generator, batch_size)
        image_latents = None
        if return_image_latents or not add_noise or (latents is None and not is_strength_max):
            image_latents = self._encode(image.to(device=device, dtype=dtype), generator)
            image_latents = image_latents.repeat(batch_size // image_latents.shape[0], 1, 1, 1)
        if not add_noise:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = image_latents
        elif latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if is_strength_max:
                latents = noise * scheduler.init_noise_sigma
            else:
                latents = scheduler.add_noise(image_latents, noise, timestep)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            noise = latents.to(device)
            latents = noise * scheduler.init_noise_sigma
        return latents, noise, image_latents

    def masked_image(self, init_image: torch.Tensor, mask_condition: torch.Tensor,
                     masked_image_latents: torch.Tensor | None) -> torch.Tensor | None:
        """What the UNet sees of the image: ``masked_image_latents`` if given, else the image where
        the mask keeps it; None when the image is already latents (a refiner's hand-off)."""
        if masked_image_latents is not None:
            return masked_image_latents
        if init_image.shape[1] == self._latent_channels():
            return None
        return init_image * (mask_condition < 0.5)

    def prepare_mask_latents(self, mask: torch.Tensor, masked_image: torch.Tensor | None, batch_size: int,
                             height: int, width: int, dtype: torch.dtype, device, generator: Generator,
                             do_classifier_free_guidance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mask at latent size and the masked image's latents (None without a masked image),
        repeated to the batch (and doubled for guidance)."""
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = _repeat_to(torch.nn.functional.interpolate(mask, size=size).to(device=device, dtype=dtype),
                          batch_size, "mask_image")
        mask = torch.cat([mask] * 2) if do_classifier_free_guidance else mask
        if masked_image is None:
            return mask, None
        masked_latents = self._encode(masked_image.to(device=device, dtype=dtype), generator)
        masked_latents = _repeat_to(masked_latents, batch_size, "image")
        if do_classifier_free_guidance:
            masked_latents = torch.cat([masked_latents] * 2)
        return mask, masked_latents.to(device=device, dtype=dtype)

    def check_inpaint_inputs(self, image, mask_image, strength: float, padding_mask_crop: int | None,
                             output_type: str) -> None:
        """Checks of the inpainting arguments (ValueError naming the argument)."""
        check_call_arguments(strength=strength)
        if image is None or mask_image is None:
            raise ValueError("image and mask_image are required")
        is_latents = isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self._latent_channels()
        if not is_latents and image_size(image) != mask_size(mask_image):
            raise ValueError(f"image is {image_size(image)} (height, width) but mask_image is "
                             f"{mask_size(mask_image)}; they must have the same size")
        if padding_mask_crop is not None:
            if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
                raise ValueError("padding_mask_crop needs image and mask_image as PIL images, got "
                                 f"{type(image).__name__} and {type(mask_image).__name__}")
            if output_type != "pil":
                raise ValueError(f"padding_mask_crop needs output_type='pil', got {output_type!r}")


    def check_unet_channels(self, mask: torch.Tensor, masked_image_latents: torch.Tensor) -> None:
        """A 9-channel UNet must take latents + mask + masked image latents; others must take 4."""
        num_channels_unet = self.unet.config.in_channels
        if num_channels_unet == 9 and masked_image_latents is None:
            raise ValueError("a 9-channel inpainting unet needs the masked image: image is latents, so pass "
                             "masked_image_latents too")
        if num_channels_unet == 9:
            total = self._latent_channels() + mask.shape[1] + masked_image_latents.shape[1]
            if total != num_channels_unet:
                raise ValueError(f"the unet takes {num_channels_unet} channels but latents, mask and masked image "
                                 f"latents give {total}; check the unet config and mask_image")
        elif num_channels_unet != 4:
            raise ValueError(f"the unet must take 4 or 9 input channels, not {num_channels_unet}")

    def keep_unmasked(self, state, latents: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
                      mask: torch.Tensor, timesteps: torch.Tensor, step: int) -> torch.Tensor:
        """A 4-channel UNet's latents after loop step ``step``: outside the mask, the image's latents
        noised to the next timestep (clean after the last step)."""
        keep = image_latents
        if step < len(timesteps) - 1:
            keep = state.scheduler.add_noise(image_latents, noise, timesteps[step + 1:step + 2])
        repaint = mask.chunk(2)[0] if self.guided(state) else mask
        return (1 - repaint) * keep + repaint * latents


class StableDiffusionInpaintPipeline(InpaintingSteps, StableDiffusionBase):
    """Text-guided inpainting with Stable Diffusion. Components as :class:`StableDiffusionPipeline`;
    the UNet takes 9 input channels (an inpainting checkpoint) or 4 (a text-to-image checkpoint)."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Repaint the white part of ``mask_image`` in ``image`` following ``prompt``.

        ``image``: PIL image, numpy array or tensor in [0, 1] (or a list; a tensor with the VAE's
        latent channel count is taken as latents). ``mask_image``: the same kinds, one channel
        (PIL images are converted to grayscale); values >= 0.5 are repainted, the rest kept.
        Both must have the same size; they are resized to ``height`` x ``width`` (default: the
        UNet's sample size times the VAE scale factor). ``masked_image_latents``: the masked
        image already encoded. ``padding_mask_crop``: inpaint only the box around the mask,
        widened by this many pixels and to the output's aspect ratio, then paste the result back
        into the original image (PIL inputs and output only). ``strength`` in [0, 1]: how much of
        the schedule runs; 1 starts from pure noise. The other arguments are those of
        :class:`StableDiffusionPipeline`.

        Returns :class:`StableDiffusionPipelineOutput` (or ``(images, nsfw_content_detected)``).
        """
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             num_images_per_prompt=num_images_per_prompt, eta=eta)
        height, width = self.default_height_width(height, width)
        state = self._begin_call(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_weighting,
                                 output_type, guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        self.check_inpaint_inputs(image, mask_image, strength, padding_mask_crop, output_type)
        batch_size = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 1. text embeddings; with guidance the negative half goes first in one batch
        prompt_embeds, negative_prompt_embeds = self.unet_prompt_embeds(
            state, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_weighting)
        self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                         num_images_per_prompt)

        # 2. the tail of the schedule that `strength` keeps
        scheduler = state.scheduler
        _, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        timesteps, num_inference_steps = timesteps_for_strength(scheduler, num_inference_steps, strength)
        if num_inference_steps < 1:
            raise ValueError(f"strength={strength} leaves {num_inference_steps} of the denoising steps; "
                             "raise strength or num_inference_steps")
        latent_timestep = timesteps[:1].repeat(batch_size)

        # 3. image, starting latents and mask
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = mask_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        init_image = preprocess_images(image, height, width, multiple=self.vae_scale_factor,
                                       latent_channels=self._latent_channels(), resize_mode=resize_mode,
                                       crops_coords=crops_coords).to(torch.float32)
        blend = self.unet.config.in_channels == 4
        latents, noise, image_latents = self.prepare_latents(
            batch_size, self._latent_channels(), height, width, prompt_embeds.dtype, device, generator, latents,
            init_image, latent_timestep, is_strength_max=strength == 1.0, return_image_latents=blend,
            scheduler=scheduler,
        )
        mask_condition = preprocess_mask(mask_image, height, width, self.vae_scale_factor, resize_mode, crops_coords)
        masked_image = self.masked_image(init_image, mask_condition, masked_image_latents)
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, masked_image, batch_size, height, width, prompt_embeds.dtype, device, generator,
            self.guided(state),
        )
        self.check_unet_channels(mask, masked_image_latents)
        extra_step = step_kwargs(scheduler, generator, eta)
        timestep_cond = self.timestep_cond(guidance_scale, batch_size, device, latents.dtype)

        # 4. denoising loop
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if state.interrupt:
                    continue
                extra = None if blend else torch.cat([mask, masked_image_latents], dim=1)
                noise_pred = self.predict_noise(state, latents, t, prompt_embeds, timestep_cond, extra_channels=extra)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if blend:  # outside the mask: the image's latents at the next step's noise level
                    latents = self.keep_unmasked(state, latents, image_latents, noise, mask, timesteps, i)
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        mask=mask, masked_image_latents=masked_image_latents))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    negative_prompt_embeds, mask = tensors["negative_prompt_embeds"], tensors["mask"]
                    masked_image_latents = tensors["masked_image_latents"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 5. decode, safety check, convert; with a crop, paste the result back into the image
        images, nsfw = self.latents_to_output(latents, output_type, generator, prompt_embeds.dtype)
        if padding_mask_crop is not None:
            images = [overlay_inpainted(mask_image, image, result, crops_coords) for result in images]
        return self._finish_call(images, nsfw, return_dict)
