"""StableDiffusionDepth2ImgPipeline: image-to-image conditioned on the input's depth map.

The UNet takes one channel more than the latents: the depth map (estimated by a transformers DPT
model, or given), resized to the latent size and scaled to [-1, 1] per image.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..utils import Generator
from .call_checks import check_call_arguments
from .call_state import pipeline_call
from .image_processing import convert_pil, image_size, postprocess_images
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from .prompt_encoding import prompt_batch_size
from .stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from .timesteps import progress_due, step_kwargs, warmup_steps
from .vae_codec import decode_latents, vae_scale_factor


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """Depth-guided image-to-image (Stable Diffusion 2 depth).

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (latent channels + 1 inputs),
    ``scheduler``, ``depth_estimator`` (transformers DPTForDepthEstimation) and
    ``feature_extractor`` (DPTImageProcessor). No safety checker.
    """

    _whole_step_loop = False  # its loop adds depth channels: eager steps

    _optional_components: tuple[str, ...] = ()
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _exclude_from_cpu_offload: tuple[str, ...] = ()

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, depth_estimator, feature_extractor) -> None:
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              depth_estimator=depth_estimator, feature_extractor=feature_extractor)
        self.vae_scale_factor = vae_scale_factor(vae)

    def prepare_depth_map(self, image, depth_map: torch.Tensor | None, batch_size: int,
                          do_classifier_free_guidance: bool, dtype: torch.dtype, device) -> torch.Tensor:
        """The depth map (estimated from ``image`` unless given, shaped (N, H, W)) resized bicubically
        to the latent size of ``image``, scaled to [-1, 1] per image, repeated to the batch (and
        doubled for guidance): (batch, 1, h, w)."""
        height, width = image_size(image)
        if depth_map is None:
            if self.depth_estimator is None or self.feature_extractor is None:
                raise ValueError("pass depth_map, or build the pipeline with a depth_estimator and feature_extractor")
            pixels = self.feature_extractor(images=_image_list(image), return_tensors="pt").pixel_values
            pixels = pixels.to(device=device, dtype=dtype)
            half = dtype in (torch.float16, torch.bfloat16) and device.type != "mps"
            autocast = torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext()
            with autocast:
                depth_map = self.depth_estimator(pixels).predicted_depth
        else:
            if depth_map.ndim != 3:
                raise ValueError(f"depth_map must be shaped (batch, height, width), got {tuple(depth_map.shape)}")
            depth_map = depth_map.to(device=device, dtype=dtype)
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        depth_map = torch.nn.functional.interpolate(depth_map.unsqueeze(1), size=size, mode="bicubic",
                                                    align_corners=False)
        low = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
        depth_map = (2.0 * (depth_map - low) / (high - low) - 1.0).to(dtype)
        if depth_map.shape[0] < batch_size:
            depth_map = depth_map.repeat(batch_size // depth_map.shape[0], 1, 1, 1)
        return torch.cat([depth_map] * 2) if do_classifier_free_guidance else depth_map

    @torch.no_grad()
    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        depth_map: torch.Tensor | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
    ):
        """Transform ``image`` following ``prompt`` while keeping its depth layout.

        ``image``: PIL image, numpy array or tensor in [0, 1] (or a list). ``depth_map``: a depth
        map (batch, height, width) to use instead of estimating one. ``strength`` in [0, 1]: how
        much of the schedule runs. The other arguments are those of :class:`StableDiffusionPipeline`.

        Returns :class:`~diffusekit.pipelines.pipeline_utils.ImagePipelineOutput` (or ``(images,)``).
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

        # 2. depth condition, the image noised to the first kept timestep
        depth_mask = self.prepare_depth_map(image, depth_map, batch_size * num_images_per_prompt,
                                            self.guided(state), prompt_embeds.dtype, device)
        scheduler = state.scheduler
        latents, timesteps, num_inference_steps = self.noised_image_latents(
            scheduler, image, strength, num_inference_steps, batch_size, num_images_per_prompt, prompt_embeds.dtype,
            device, generator)
        extra_step = step_kwargs(scheduler, generator, eta)

        # 3. denoising loop
        state.num_timesteps = len(timesteps)
        warmup = warmup_steps(timesteps, num_inference_steps, scheduler)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                noise_pred = self.predict_noise(state, latents, t, prompt_embeds, extra_channels=depth_mask)
                latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
                if state.callback is not None:
                    tensors = self.step_callback(state, i, t, dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        depth_mask=depth_mask))
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                    negative_prompt_embeds, depth_mask = tensors["negative_prompt_embeds"], tensors["depth_mask"]
                if progress_due(i, timesteps, warmup, scheduler):
                    progress.update()

        # 4. decode and convert (no safety checker)
        images = latents
        if output_type != "latent":
            images = postprocess_images(decode_latents(self.vae, latents, generator), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _image_list(image) -> list:
    """A batch as a list of single images (PIL ones in RGB), as the depth estimator's image processor takes it."""
    images = list(image) if isinstance(image, (list, tuple)) or getattr(image, "ndim", 3) == 4 else [image]
    return [convert_pil(i, "RGB") if isinstance(i, Image.Image) else i for i in images]
