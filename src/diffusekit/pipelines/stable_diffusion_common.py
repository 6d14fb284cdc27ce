"""What the Stable Diffusion pipelines share: components, checks, prompt encoding, the guided
noise prediction, step callbacks, decoding with the safety checker.

Subclasses (text-to-image, image-to-image, inpainting, depth-to-image) write their own ``__call__``
from these pieces; see :class:`~diffusekit.pipelines.stable_diffusion.StableDiffusionPipeline`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..image_processor import ImageProcessorMixin
from ..loaders.lora import LoraLoaderMixin
from ..loaders.single_file import FromSingleFileMixin
from ..loaders.textual_inversion import TextualInversionLoaderMixin
from ..models.cache import denoiser_cache_context
from ..utils import BaseOutput, Generator
from . import prompt_encoding
from .call_checks import check_image_size
from .call_state import CallState, CallStateProperties, begin_call, current_call
from . import whole_step
from .guidance import guidance_scale_embedding, guided_noise, uses_guidance
from .image_processing import numpy_to_pil, postprocess_images
from .ip_adapter_common import IPAdapterPipelineMixin
from .unet_options import UNetOptionsMixin
from .memory import MemoryMixin
from .noise import initial_noise
from .pipeline_utils import DiffusionPipeline
from .vae_codec import decode_latents, vae_scale_factor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """``images`` (PIL list, numpy (N, H, W, C), tensor, or latents) and, per image, whether the
    safety checker flagged it (None without a safety checker)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None


def _fix_legacy_scheduler_config(scheduler) -> None:
    """Old SD scheduler configs: ``steps_offset`` must be 1 and ``clip_sample`` False (the reference
    rewrites both with a deprecation warning; so do we)."""
    if scheduler is None:
        return
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        logger.warning("%s has steps_offset=%s; using 1 as Stable Diffusion expects (update the config file)",
                       type(scheduler).__name__, scheduler.config.steps_offset)
        scheduler.register_to_config(steps_offset=1)
    if getattr(scheduler.config, "clip_sample", False) is True:
        logger.warning("%s has clip_sample=True; using False as Stable Diffusion expects (update the config file)",
                       type(scheduler).__name__)
        scheduler.register_to_config(clip_sample=False)


class StableDiffusionBase(CallStateProperties, DiffusionPipeline, MemoryMixin, LoraLoaderMixin, TextualInversionLoaderMixin,
                          FromSingleFileMixin, IPAdapterPipelineMixin, UNetOptionsMixin, ImageProcessorMixin):
    """Components and shared steps of the Stable Diffusion pipelines (no ``__call__``)."""

    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _exclude_from_cpu_offload = ("safety_checker",)
    #: Whether the VAE config's ``force_upcast`` makes a half-precision VAE encode/decode in float32
    #: (the reference's SD pipelines ignore it; SDXL's honour it).
    _vae_force_upcast = False
    #: Whether latents are normalised with the VAE config's ``latents_mean`` / ``latents_std`` when
    #: decoding and image-to-image encoding (SDXL's reference does it, SD's does not).
    _vae_latent_stats = False
    _lora_loadable_modules = ["unet", "text_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True) -> None:
        super().__init__()
        _fix_legacy_scheduler_config(scheduler)
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "You have disabled the safety checker for %s by passing `safety_checker=None`. Ensure that you "
                "abide by the conditions of the Stable Diffusion license and do not expose unfiltered results in "
                "services or applications open to the public. Keep the safety filter enabled in all public facing "
                "circumstances, disabling it only for use-cases that involve analyzing network behavior or "
                "auditing its results.", type(self).__name__,
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(f"{type(self).__name__}: a safety_checker needs a feature_extractor; pass one, "
                             "or pass safety_checker=None")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, safety_checker=safety_checker,
                              feature_extractor=feature_extractor, image_encoder=image_encoder)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = vae_scale_factor(vae)

    # -- the running call's state, for step callbacks (see call_state.py) ------------------------

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guided(current_call(self))

    def guided(self, state: CallState) -> bool:
        """Whether the call runs the unconditional branch (see :func:`uses_guidance`)."""
        return uses_guidance(state.guidance_scale, self.unet)

    # -- checks ---------------------------------------------------------------------------------

    def default_height_width(self, height: int | None, width: int | None) -> tuple[int, int]:
        """``height``/``width``, by default the UNet's sample size times the VAE scale factor."""
        size = self.unet.config.sample_size
        size_h, size_w = (size, size) if isinstance(size, int) else size
        return (size_h * self.vae_scale_factor if height is None else height,
                size_w * self.vae_scale_factor if width is None else width)

    def callback_names(self, callback, names: Sequence[str] | None) -> list[str]:
        """The tensors a step callback receives: a callback object's ``tensor_inputs``, else ``names``."""
        names = getattr(callback, "tensor_inputs", names)
        return list(names or [])

    def check_inputs(self, prompt, height: int | None = None, width: int | None = None, negative_prompt=None,
                     prompt_embeds=None, negative_prompt_embeds=None, callback_names: Sequence[str] = (),
                     prompt_weighting: str | None = None, output_type: str = "pil") -> None:
        """Argument checks shared by the SD pipelines; each raises ValueError naming the argument."""
        check_image_size(height, width, multiple=8)
        unknown = [n for n in callback_names if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name {list(self._callback_tensor_inputs)}, "
                             f"got {unknown}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        prompt_encoding.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                            prompt_weighting)

    def _begin_call(self, prompt, height: int | None, width: int | None, negative_prompt, prompt_embeds,
                    negative_prompt_embeds, callback, callback_inputs: Sequence[str] | None,
                    prompt_weighting: str | None, output_type: str, guidance_scale: float,
                    guidance_rescale: float = 0.0, clip_skip: int | None = None,
                    cross_attention_kwargs: dict | None = None) -> CallState:
        """Check the shared arguments; the call's state, with its own copy of the scheduler."""
        callback_names = self.callback_names(callback, callback_inputs)
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          callback_names, prompt_weighting, output_type)
        return begin_call(self, CallState(
            scheduler=self.scheduler.for_call(), guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs, callback=callback,
            callback_names=callback_names))

    # -- steps ----------------------------------------------------------------------------------

    def encode_prompt(self, prompt, device, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                      negative_prompt=None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, lora_scale: float | None = None,
                      clip_skip: int | None = None, prompt_weighting: str | None = None):
        """``(prompt_embeds, negative_prompt_embeds)``; see :func:`prompt_encoding.encode_prompt`.
        ``lora_scale`` scales the text encoder's LoRA adapters; textual-inversion tokens are
        expanded (``maybe_convert_prompt``)."""
        dtype = self.unet.dtype if self.unet is not None else None
        with prompt_encoding.TOKENIZER_LOCK:
            prompt, negative_prompt = self.maybe_convert_prompt(prompt), self.maybe_convert_prompt(negative_prompt)
        with self.lora_text_encoder_scale(lora_scale):
            prompt_embeds, negative_prompt_embeds = prompt_encoding.encode_prompt(
                self.text_encoder, self.tokenizer, prompt, device, num_images_per_prompt,
                do_classifier_free_guidance, negative_prompt, prompt_embeds, negative_prompt_embeds,
                clip_skip=clip_skip, prompt_weighting=prompt_weighting, dtype=dtype,
            )
        # the names returned are the __call__ arguments they feed (tools read them from this source)
        return prompt_embeds, negative_prompt_embeds

    def unet_prompt_embeds(self, state: CallState, prompt, device, num_images_per_prompt: int, negative_prompt,
                           prompt_embeds, negative_prompt_embeds, prompt_weighting: str | None):
        """:meth:`encode_prompt` for the denoising loop (the call's guidance, LoRA scale and
        ``clip_skip``): ``(UNet text embeddings, negative embeddings)``; with guidance the UNet's
        batch holds the negative half first."""
        guided = self.guided(state)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, guided, negative_prompt, prompt_embeds, negative_prompt_embeds,
            lora_scale=state.lora_scale, clip_skip=state.clip_skip, prompt_weighting=prompt_weighting,
        )
        if guided:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        return prompt_embeds, negative_prompt_embeds

    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int,
                        dtype: torch.dtype, device, generator: Generator, latents: torch.Tensor | None = None,
                        scheduler=None):
        """Starting noise (or ``latents``) for a ``height`` x ``width`` image, times the
        ``init_noise_sigma`` of ``scheduler`` (default: the pipeline's)."""
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        scale = (scheduler or self.scheduler).init_noise_sigma
        return initial_noise(shape, generator, device, dtype, latents, scale=scale)

    def timestep_cond(self, guidance_scale: float, batch_size: int, device, dtype: torch.dtype) -> torch.Tensor | None:
        """The guidance-scale embedding of guidance-distilled UNets (``time_cond_proj_dim``), else None."""
        dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if dim is None:
            return None
        return guidance_scale_embedding(guidance_scale, batch_size, dim).to(device=device, dtype=dtype)

    def predict_noise(self, state: CallState, latents: torch.Tensor, t, prompt_embeds: torch.Tensor,
                      timestep_cond: torch.Tensor | None = None,
                      extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """One guided UNet prediction for the call ``state``.

        With guidance the latents are doubled (``prompt_embeds`` then holds the negative half first),
        scaled by the call's scheduler, optionally concatenated with ``extra_channels`` along the
        channels (inpainting masks, depth maps; already doubled), and the halves combined by
        :func:`~diffusekit.pipelines.guidance.apply_guidance` (with the call's ``guidance_rescale``).
        The UNet also gets the call's ``cross_attention_kwargs`` and ``denoiser_kwargs``.
        """
        options = {k: v for k, v in (("timestep_cond", timestep_cond),
                                     ("cross_attention_kwargs", state.cross_attention_kwargs)) if v is not None}
        with denoiser_cache_context(self.unet, "cond"):
            return guided_noise(self.unet, lambda sample: state.scheduler.scale_model_input(sample, t), latents, t,
                                prompt_embeds, self.guided(state), state.guidance_scale, state.guidance_rescale,
                                extra_channels, {**options, **state.denoiser_kwargs})

    def denoising_step(self, state: CallState, latents: torch.Tensor, t, prompt_embeds: torch.Tensor,
                       timestep_cond: torch.Tensor | None = None, extra_step: dict | None = None) -> torch.Tensor:
        """:meth:`predict_noise` then the call's scheduler step: the next latents. After
        ``pipe.compile(whole_step=True)`` both run as one compiled graph where they can
        (:mod:`~diffusekit.pipelines.whole_step`)."""
        call = whole_step.call_plan(self, state, self.unet, latents, extra_step or {})
        if call is not None:
            options = {**({} if timestep_cond is None else {"timestep_cond": timestep_cond}),
                       **whole_step.without_scale("cross_attention_kwargs", state.cross_attention_kwargs),
                       **state.denoiser_kwargs}
            inputs = dict(prompt_embeds=prompt_embeds, guided=self.guided(state),
                          guidance_rescale=float(state.guidance_rescale), options=options)
            stepped = call.step(state, self.unet, whole_step.sd_prediction, latents, t, inputs,
                                {"guidance_scale": state.guidance_scale})
            if stepped is not None:
                return stepped
        noise_pred = self.predict_noise(state, latents, t, prompt_embeds, timestep_cond)
        return state.scheduler.step(noise_pred, t, latents, **(extra_step or {}), return_dict=False)[0]

    def run_safety_checker(self, image: torch.Tensor, device, dtype: torch.dtype):
        """``(image with flagged images blacked out, flags)``; flags are None without a checker."""
        if self.safety_checker is None:
            return image, None
        if torch.is_tensor(image):
            pil_images = postprocess_images(image, "pil")
        else:
            pil_images = numpy_to_pil(image)
        clip_input = self.feature_extractor(pil_images, return_tensors="pt").pixel_values.to(device=device,
                                                                                           dtype=dtype)
        return self.safety_checker(images=image, clip_input=clip_input)

    def latents_to_output(self, latents: torch.Tensor, output_type: str, generator: Generator = None,
                          dtype: torch.dtype | None = None):
        """Decode (see :func:`~diffusekit.pipelines.vae_codec.decode_latents`), run the safety checker,
        and convert to ``output_type``; returns ``(images, nsfw flags or None)``. ``latent``
        returns the latents unchanged."""
        if output_type == "latent":
            return latents, None
        image = decode_latents(self.vae, latents, generator)
        image, flags = self.run_safety_checker(image, self._execution_device, dtype or latents.dtype)
        keep = None if flags is None else [not flag for flag in flags]
        return postprocess_images(image, output_type, do_denormalize=keep), flags

    def _finish_call(self, images, nsfw: list[bool] | None, return_dict: bool):
        """Release offload hooks; :class:`StableDiffusionPipelineOutput` (or ``(images, nsfw)``)."""
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
