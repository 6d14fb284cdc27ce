"""What the FLUX.1 pipelines share: latent packing and position ids, the resolution-dependent
schedule shift, T5 + CLIP prompt encoding, the transformer call, step callbacks and decoding.

FLUX works on VAE latents cut into 2x2 patches: a (B, C, H, W) latent becomes (B, H/2 * W/2, 4C)
tokens ("packing"), each with a position id ``(0, row, column)``; text tokens have id ``(0, 0, 0)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..image_processor import ImageProcessorMixin
from ..loaders.lora import LoraLoaderMixin
from ..models.cache import denoiser_cache_context
from ..utils import BaseOutput
from .call_checks import check_image_size, check_prompt_text
from . import whole_step
from .call_state import CallState, CallStateProperties, begin_call
from .image_processing import postprocess_images
from .memory import MemoryMixin
from .pipeline_utils import DiffusionPipeline
from .prompt_encoding import tokenize
from .vae_codec import decode_latents, vae_scale_factor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEQUENCE_LENGTH = 512


@dataclass
class FluxPipelineOutput(BaseOutput):
    """``images``: PIL images, a numpy array (N, H, W, C), a tensor (N, C, H, W), or packed latents."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


# -- latents ------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches (channel-major in a patch)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (``height``, ``width``) latent grid (both even)."""
    batch, _, features = latents.shape
    patches = latents.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Position ids (height * width, 3) of the packed tokens, row-major: ``(0, row, column)``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


# -- schedule -----------------------------------------------------------------------------------


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The schedule shift ``mu`` for ``image_seq_len`` tokens: linear from ``base_shift`` at
    ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (larger images get noisier schedules)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def scheduler_shift(scheduler, image_seq_len: int) -> float:
    """:func:`calculate_shift` with the scheduler config's ``base/max_image_seq_len`` and ``base/max_shift``."""
    config = scheduler.config
    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def default_sigmas(scheduler, num_inference_steps: int, sigmas: Sequence[float] | None) -> Sequence[float] | None:
    """``sigmas``, by default ``linspace(1, 1/N, N)``; None for schedulers that build flow sigmas themselves."""
    if getattr(scheduler.config, "use_flow_sigmas", False):
        return None
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas


# -- the pipelines' shared base -----------------------------------------------------------------


def _as_list(text: str | list[str]) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


def _repeat_per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """Each prompt's row ``num_images_per_prompt`` times in a row (prompt-major order)."""
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)


def flux_velocity(denoise: Callable, latents: torch.Tensor, t: torch.Tensor, guidance: torch.Tensor | None,
                  prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, text_ids: torch.Tensor,
                  image_ids: torch.Tensor, negative: tuple | None = None, true_cfg_scale=1.0,
                  options: dict[str, Any] | None = None) -> torch.Tensor:
    """The velocity at schedule timestep ``t`` (0-1000) through ``denoise(branch, **transformer kwargs)``;
    with ``negative`` ``(embeds, pooled, text ids)``, true classifier-free guidance
    ``neg + true_cfg_scale * (cond - neg)`` (a second call, branch "uncond"). Host-sync free, so a
    compiled whole step traces it (``true_cfg_scale`` may be a tensor)."""
    timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000

    def branch(name: str, embeds: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return denoise(name, hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=embeds, txt_ids=ids, img_ids=image_ids, return_dict=False,
                       **(options or {}))[0]

    velocity = branch("cond", prompt_embeds, pooled_prompt_embeds, text_ids)
    if negative is None:
        return velocity
    uncond = branch("uncond", *negative)
    return uncond + true_cfg_scale * (velocity - uncond)


def flux_prediction(denoiser: torch.nn.Module, scale_input: Callable, latents: torch.Tensor, t: torch.Tensor,
                    inputs: dict[str, Any]) -> torch.Tensor:
    """The FLUX family's ``predict`` for :func:`~diffusekit.pipelines.whole_step.step_frame`."""
    return flux_velocity(lambda branch, **kwargs: denoiser.forward(**kwargs), scale_input(latents), t, **inputs)


class FluxBase(CallStateProperties, MemoryMixin, DiffusionPipeline, LoraLoaderMixin, ImageProcessorMixin):
    """Components and shared steps of the FLUX.1 pipelines (no ``__call__``).

    Components: ``scheduler`` (FlowMatchEulerDiscreteScheduler), ``vae`` (AutoencoderKL, 16 latent
    channels), ``text_encoder`` + ``tokenizer`` (CLIP, pooled output), ``text_encoder_2`` +
    ``tokenizer_2`` (T5, token embeddings), ``transformer`` (FluxTransformer2DModel). ``image_encoder``
    and ``feature_extractor`` are kept for the reference's layout; IP-Adapters are not supported.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components = ("image_encoder", "feature_extractor")
    _callback_tensor_inputs = ("latents", "prompt_embeds")
    _lora_loadable_modules = ["transformer", "text_encoder"]
    #: Default height and width in latent pixels (times the VAE scale factor: 1024 for FLUX.1).
    default_sample_size = 128
    _image_size_multiple = 2  # 2x2 latent patches

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, transformer=transformer, scheduler=scheduler,
                              image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.latent_channels = vae.config.latent_channels if vae is not None else 16
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77

    # -- checks ---------------------------------------------------------------------------------

    def _begin_call(self, guidance_scale: float, joint_attention_kwargs: dict[str, Any] | None, callback,
                    callback_names: Sequence[str]) -> CallState:
        """The call's state, with its own copy of the scheduler."""
        return begin_call(self, CallState(scheduler=self.scheduler.for_call(), guidance_scale=guidance_scale,
                                          joint_attention_kwargs=joint_attention_kwargs, callback=callback,
                                          callback_names=list(callback_names or ())))

    def check_inputs(self, prompt, prompt_2, height: int, width: int, negative_prompt=None, negative_prompt_2=None,
                     prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                     negative_pooled_prompt_embeds=None, callback_on_step_end_tensor_inputs: Sequence[str] = (),
                     max_sequence_length: int | None = None, output_type: str = "pil") -> None:
        """The reference's argument checks (ValueError naming the argument)."""
        check_image_size(height, width)
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            logger.warning("height and width must be divisible by %d, got %d and %d; the image is made smaller to fit",
                           multiple, height, width)
        unknown = [n for n in callback_on_step_end_tensor_inputs or () if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name {list(self._callback_tensor_inputs)}, "
                             f"got {unknown}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        for name, text, embeds_name, embeds in (("prompt", prompt, "prompt_embeds", prompt_embeds),
                                                ("prompt_2", prompt_2, "prompt_embeds", prompt_embeds),
                                                ("negative_prompt", negative_prompt, "negative_prompt_embeds",
                                                 negative_prompt_embeds),
                                                ("negative_prompt_2", negative_prompt_2, "negative_prompt_embeds",
                                                 negative_prompt_embeds)):
            if text is not None and embeds is not None:
                raise ValueError(f"pass either {name} or {embeds_name}, not both")
            check_prompt_text(name, text)
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt or prompt_embeds; both are None")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds need pooled_prompt_embeds from the same text encoders")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds need negative_pooled_prompt_embeds from the same text encoders")
        if max_sequence_length is not None and max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH}, "
                             f"got {max_sequence_length}")

    # -- text -----------------------------------------------------------------------------------

    def _get_t5_prompt_embeds(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                              max_sequence_length: int = 512, device=None) -> torch.Tensor:
        """T5 token embeddings (B * num_images_per_prompt, max_sequence_length, dim), padded and cut."""
        inputs = tokenize(self.tokenizer_2, _as_list(prompt), max_sequence_length,
                          encoder_name=f"T5 (max_sequence_length={max_sequence_length})")
        encoder = self.text_encoder_2
        embeds = encoder(inputs.input_ids.to(encoder.device), output_hidden_states=False)[0]
        embeds = embeds.to(dtype=encoder.dtype, device=device or self._execution_device)
        return _repeat_per_image(embeds, num_images_per_prompt)

    def _get_clip_prompt_embeds(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                                device=None) -> torch.Tensor:
        """CLIP's pooled embedding (B * num_images_per_prompt, dim)."""
        inputs = tokenize(self.tokenizer, _as_list(prompt), self.tokenizer_max_length)
        encoder = self.text_encoder
        pooled = encoder(inputs.input_ids.to(encoder.device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=encoder.dtype, device=device or self._execution_device)
        return _repeat_per_image(pooled, num_images_per_prompt)

    def encode_prompt(self, prompt: str | list[str] | None, prompt_2: str | list[str] | None = None, device=None,
                      num_images_per_prompt: int = 1, prompt_embeds: torch.Tensor | None = None,
                      pooled_prompt_embeds: torch.Tensor | None = None, max_sequence_length: int = 512,
                      lora_scale: float | None = None):
        """``(prompt_embeds, pooled_prompt_embeds, text_ids)``: T5 embeddings of ``prompt_2`` (default
        ``prompt``), CLIP's pooled embedding of ``prompt``, and the (tokens, 3) zero position ids.

        Embeddings, computed or given, are repeated ``num_images_per_prompt`` times per prompt (the
        reference repeats only computed ones and fails on given ones with several images per prompt).
        ``lora_scale`` scales the text encoders' LoRA adapters for this call, as in the reference.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            with self.lora_text_encoder_scale(lora_scale):
                pooled_prompt_embeds = self._get_clip_prompt_embeds(prompt, num_images_per_prompt, device)
                prompt_embeds = self._get_t5_prompt_embeds(prompt_2 or prompt, num_images_per_prompt,
                                                           max_sequence_length, device)
        elif num_images_per_prompt > 1:
            prompt_embeds = _repeat_per_image(prompt_embeds.to(device), num_images_per_prompt)
            pooled_prompt_embeds = _repeat_per_image(pooled_prompt_embeds.to(device), num_images_per_prompt)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    def call_prompt_embeds(self, state: CallState, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale: float,
                           batch_size: int, device, num_images_per_prompt: int, prompt_embeds, pooled_prompt_embeds,
                           negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length: int):
        """``(prompt_embeds, pooled_prompt_embeds, text_ids, negative)`` for a call: :meth:`encode_prompt`
        (the call's LoRA scale from ``joint_attention_kwargs``), and ``negative``, the same triple for the negative
        prompt when true CFG is on (``true_cfg_scale`` > 1 with a negative prompt or negative
        embeddings), else None."""
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)
        if true_cfg_scale > 1 and has_negative and prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                             f"directly, but got: `prompt_embeds` {tuple(prompt_embeds.shape)} != "
                             f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)}.")
        lora_scale = state.lora_scale
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
            max_sequence_length, lora_scale)
        negative = None
        if true_cfg_scale > 1 and has_negative:
            negative = self.encode_negative_prompt(
                negative_prompt, negative_prompt_2, batch_size, device, num_images_per_prompt,
                negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length, lora_scale)
        return prompt_embeds, pooled_prompt_embeds, text_ids, negative

    def encode_negative_prompt(self, negative_prompt, negative_prompt_2, batch_size: int, device,
                               num_images_per_prompt: int, negative_prompt_embeds: torch.Tensor | None,
                               negative_pooled_prompt_embeds: torch.Tensor | None, max_sequence_length: int,
                               lora_scale: float | None = None):
        """:meth:`encode_prompt` for true CFG's negative branch; a single negative prompt serves every prompt."""
        if negative_prompt_embeds is None:
            negative_prompt, negative_prompt_2 = (
                _match_batch(text, batch_size, name)
                for text, name in ((negative_prompt, "negative_prompt"), (negative_prompt_2, "negative_prompt_2")))
        return self.encode_prompt(negative_prompt, negative_prompt_2, device, num_images_per_prompt,
                                  negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length,
                                  lora_scale)

    # -- latents and the transformer --------------------------------------------------------------

    def default_height_width(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.default_sample_size * self.vae_scale_factor
        return default if height is None else height, default if width is None else width

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid of a ``height`` x ``width`` image, both rounded down to even numbers."""
        multiple = self.vae_scale_factor * 2
        return 2 * (int(height) // multiple), 2 * (int(width) // multiple)

    def guidance_vector(self, guidance_scale: float, batch: int, device) -> torch.Tensor | None:
        """The distilled guidance scale per sample, for transformers with ``guidance_embeds``; else None."""
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)

    def predict_velocity(self, state: CallState, branch: str = "cond", **transformer_kwargs: Any) -> tuple:
        """One transformer call with the call's ``joint_attention_kwargs`` and ``denoiser_kwargs``;
        ``branch`` names the cache context."""
        with denoiser_cache_context(self.transformer, branch):
            return self.transformer(joint_attention_kwargs=state.joint_attention_kwargs, **transformer_kwargs,
                                    **state.denoiser_kwargs)

    def guided_velocity(self, state: CallState, latents: torch.Tensor, t: torch.Tensor,
                        guidance: torch.Tensor | None, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                        text_ids: torch.Tensor, image_ids: torch.Tensor, negative: tuple | None = None,
                        true_cfg_scale: float = 1.0) -> torch.Tensor:
        """The velocity at schedule timestep ``t`` (:func:`flux_velocity` through :meth:`predict_velocity`)."""
        return flux_velocity(functools.partial(self.predict_velocity, state), latents, t, guidance, prompt_embeds,
                             pooled_prompt_embeds, text_ids, image_ids, negative, true_cfg_scale)

    def denoising_step(self, state: CallState, latents: torch.Tensor, t: torch.Tensor, guidance: torch.Tensor | None,
                       prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, text_ids: torch.Tensor,
                       image_ids: torch.Tensor, negative: tuple | None = None,
                       true_cfg_scale: float = 1.0) -> torch.Tensor:
        """:meth:`guided_velocity` then the call's scheduler step: the next latents; one compiled graph
        after ``pipe.compile(whole_step=True)`` where it can (:mod:`~diffusekit.pipelines.whole_step`)."""
        call = whole_step.call_plan(self, state, self.transformer, latents, {})
        if call is not None:
            options = {**whole_step.without_scale("joint_attention_kwargs", state.joint_attention_kwargs),
                       **state.denoiser_kwargs}
            inputs = dict(guidance=guidance, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          text_ids=text_ids, image_ids=image_ids, negative=negative, options=options)
            stepped = call.step(state, self.transformer, flux_prediction, latents, t, inputs,
                                {"true_cfg_scale": true_cfg_scale})
            if stepped is not None:
                return stepped
        velocity = self.guided_velocity(state, latents, t, guidance, prompt_embeds, pooled_prompt_embeds, text_ids,
                                        image_ids, negative, true_cfg_scale)
        return state.scheduler.step(velocity, t, latents, return_dict=False)[0]

    def latents_to_output(self, latents: torch.Tensor, height: int, width: int, output_type: str):
        """Unpack, undo the VAE's scaling and shift, decode and convert; ``latent`` returns the packed latents."""
        if output_type == "latent":
            return latents
        latents = unpack_latents(latents, *self.latent_size(height, width))
        image = decode_latents(self.vae, latents, shift_factor=self.vae.config.shift_factor or 0.0)
        return postprocess_images(image, output_type)

    def _finish_call(self, images, return_dict: bool):
        """Release offload hooks; :class:`FluxPipelineOutput` (or ``(images,)``)."""
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if return_dict else (images,)


def _match_batch(text: str | list[str] | None, batch_size: int, name: str) -> list[str] | None:
    """A negative prompt for each of ``batch_size`` prompts (a single string serves all)."""
    if text is None:
        return None
    if isinstance(text, str):
        return [text] * batch_size
    if len(text) != batch_size:
        raise ValueError(f"{name} holds {len(text)} prompts but prompt holds {batch_size}; they must match")
    return list(text)
