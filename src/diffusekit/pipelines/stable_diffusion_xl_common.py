"""What the Stable Diffusion XL pipelines share: two text encoders, the pooled embedding and the
micro-conditioning ("added" conditioning of the UNet), and decoding.

SDXL encodes a prompt with CLIP ViT-L (``text_encoder``) and OpenCLIP bigG with a projection
(``text_encoder_2``): the penultimate hidden states of both (``clip_skip`` goes further back) are
concatenated, and the second encoder's projected pooled output joins the UNet's time embedding
together with the "time ids" (original size, crop corner, target size or aesthetic score). The
refiner has only the second encoder. Everything else is the SD pipelines' (see
:class:`~diffusekit.pipelines.stable_diffusion_common.StableDiffusionBase`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..utils import BaseOutput, Generator
from . import prompt_encoding
from .call_checks import check_prompt_text
from .call_state import ADDED_COND, CallField, CallState
from .image_processing import postprocess_images
from .pipeline_utils import DiffusionPipeline
from .stable_diffusion_common import StableDiffusionBase
from .vae_codec import decode_latents, vae_scale_factor



@dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    """``images``: PIL list, numpy (N, H, W, C), tensor, or latents."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


def _as_list(text: str | list[str] | None) -> list[str] | None:
    return [text] if isinstance(text, str) else text


def _per_prompt(name: str, text: str | list[str], batch_size: int) -> list[str]:
    """A negative prompt for each of ``batch_size`` prompts (a string is used for all)."""
    texts = [text] * batch_size if isinstance(text, str) else list(text)
    if len(texts) != batch_size:
        raise ValueError(f"{name} holds {len(texts)} prompts but prompt holds {batch_size}; they must match")
    return texts


class StableDiffusionXLBase(StableDiffusionBase):
    """Components and shared steps of the SDXL pipelines (no ``__call__``).

    Components: ``vae``, ``text_encoder`` (CLIPTextModel, None for the refiner), ``text_encoder_2``
    (CLIPTextModelWithProjection), ``tokenizer``, ``tokenizer_2``, ``unet``, ``scheduler``, and
    ``image_encoder`` / ``feature_extractor`` (IP-Adapter image prompts, see ``load_ip_adapter``; may be None).
    ``force_zeros_for_empty_prompt``: without a negative prompt, the unconditional embeddings are
    zeros (not the empty prompt's). ``add_watermarker`` is accepted and ignored (no watermark).
    """

    _optional_components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder",
                            "feature_extractor")
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _exclude_from_cpu_offload = ()
    _vae_force_upcast = True
    _vae_latent_stats = True  # but inpainting encodes without them, as the reference does
    #: The base pipeline repeats ``[negative, positive]`` time ids per image (interleaved); the
    #: img2img and inpainting pipelines put all negative rows first (as the reference does).
    _interleaved_time_ids = False
    denoising_start = CallField("denoising_start")
    denoising_end = CallField("denoising_end")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None) -> None:
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                              feature_extractor=feature_extractor)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.watermark = None

    # -- checks ---------------------------------------------------------------------------------

    @staticmethod
    def check_xl_prompts(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                         negative_pooled_prompt_embeds) -> None:
        """The checks SDXL adds to SD's (ValueError naming the argument)."""
        check_prompt_text("prompt_2", prompt_2)
        check_prompt_text("negative_prompt_2", negative_prompt_2)
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt_2 or prompt_embeds, not both")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt_2 or negative_prompt_embeds, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds need pooled_prompt_embeds (text_encoder_2's pooled output) too")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds need negative_pooled_prompt_embeds too")

    # -- prompts --------------------------------------------------------------------------------

    def _text_encoders(self) -> list[tuple]:
        """``(tokenizer, text_encoder)`` pairs: both, or the second only (the refiner)."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return pairs if self.text_encoder is not None else pairs[1:]

    def _encode_texts(self, text_lists: Sequence[list[str]], clip_skip: int | None, pooled: torch.Tensor | None,
                      max_length: int | None = None, warn: bool = True, prompt_weighting: str | None = None,
                      num_windows: int | None = None):
        """Texts (one list per encoder) to ``(concatenated hidden states, pooled)``; ``pooled`` is
        the second encoder's projected output unless given."""
        states = []
        for texts, (tokenizer, encoder) in zip(text_lists, self._text_encoders()):
            with prompt_encoding.TOKENIZER_LOCK:
                texts = self.maybe_convert_prompt(texts, tokenizer)
            if prompt_weighting == "a1111":
                states.append(prompt_encoding.encode_weighted_text(encoder, tokenizer, texts, clip_skip, num_windows,
                                                                   penultimate=True))
                ids = torch.tensor([prompt_encoding.weighted_token_windows(tokenizer, t)[0][0] for t in texts])
                out = encoder(ids.to(encoder.device)) if pooled is None else None
            else:
                ids = prompt_encoding.tokenize(tokenizer, texts, max_length, warn).input_ids
                out = encoder(ids.to(encoder.device), output_hidden_states=True)
                states.append(out.hidden_states[-((clip_skip or 0) + 2)])
            if out is not None and pooled is None and out[0].ndim == 2:
                pooled = out[0]
        return torch.cat(states, dim=-1), pooled

    def _window_count(self, *groups: Sequence[list[str]]) -> int:
        """The most 77-token windows any of the texts needs (A1111 weighting); each group holds
        one list of texts per encoder."""
        pairs = self._text_encoders()
        return max(len(prompt_encoding.weighted_token_windows(tokenizer, text))
                   for group in groups for texts, (tokenizer, _) in zip(group, pairs) for text in texts)

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt=None, negative_prompt_2=None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      pooled_prompt_embeds: torch.Tensor | None = None,
                      negative_pooled_prompt_embeds: torch.Tensor | None = None, lora_scale: float | None = None,
                      clip_skip: int | None = None, prompt_weighting: str | None = None):
        """``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``,
        each repeated per image (the negative ones None without guidance).

        ``prompt_2`` / ``negative_prompt_2`` go to the second encoder (default: ``prompt`` /
        ``negative_prompt``). ``clip_skip`` applies to the prompt only, as in the reference. With
        ``prompt_weighting="a1111"`` both encoders read weights and take long prompts (see
        :mod:`~diffusekit.pipelines.prompt_encoding`); the pooled embedding comes from the first window.
        """
        device = device or self._execution_device
        batch_size = prompt_encoding.prompt_batch_size(prompt, prompt_embeds)
        zero_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        uncond = None
        if do_classifier_free_guidance and negative_prompt_embeds is None and not zero_negative:
            negative_prompt = negative_prompt or ""
            uncond = [_per_prompt("negative_prompt", negative_prompt, batch_size),
                      _per_prompt("negative_prompt_2", negative_prompt_2 or negative_prompt, batch_size)]
        windows = None
        with self.lora_text_encoder_scale(lora_scale):
            if prompt_embeds is None:
                text_lists = [_as_list(prompt), _as_list(prompt_2 or prompt)]
                if prompt_weighting == "a1111":
                    windows = self._window_count(text_lists, *([uncond] if uncond else []))
                prompt_embeds, pooled_prompt_embeds = self._encode_texts(
                    text_lists, clip_skip, pooled_prompt_embeds, prompt_weighting=prompt_weighting,
                    num_windows=windows)
            if uncond is not None:
                if prompt_weighting == "a1111":
                    windows = prompt_embeds.shape[1] // self._text_encoders()[0][0].model_max_length
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_texts(
                    uncond, None, negative_pooled_prompt_embeds, prompt_embeds.shape[1], warn=False,
                    prompt_weighting=prompt_weighting, num_windows=windows)
            elif do_classifier_free_guidance and negative_prompt_embeds is None:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)

        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
        return tuple(None if x is None else x.to(device).repeat_interleave(num_images_per_prompt, dim=0)
                     for x in (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                               negative_pooled_prompt_embeds))

    def unet_text_inputs(self, state: CallState, prompt, prompt_2, device, num_images_per_prompt: int,
                         negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                         pooled_prompt_embeds, negative_pooled_prompt_embeds, prompt_weighting: str | None):
        """:meth:`encode_prompt` for the denoising loop (the call's guidance, LoRA scale and
        ``clip_skip``): ``(UNet text embeddings, pooled embeddings, negative pooled or None)``; with
        guidance the batch holds the negative half first."""
        guided = self.guided(state)
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, guided, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            lora_scale=state.lora_scale, clip_skip=state.clip_skip, prompt_weighting=prompt_weighting)
        if guided:
            embeds = torch.cat([negative, embeds])
        return embeds, pooled, negative_pooled

    # -- micro-conditioning ---------------------------------------------------------------------

    def projection_dim(self, pooled: torch.Tensor) -> int:
        """Width of the pooled text embedding: text_encoder_2's projection (or ``pooled``'s width)."""
        if self.text_encoder_2 is None:
            return int(pooled.shape[-1])
        return self.text_encoder_2.config.projection_dim

    def time_ids(self, values: Sequence[float], projection_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """One row of time ids (1, len(values)); ValueError when the UNet's added embedding expects
        another width (naming ``requires_aesthetics_score`` when that is the likely cause)."""
        per_id = self.unet.config.addition_time_embed_dim
        passed = per_id * len(values) + projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if expected != passed:
            hint = "check unet.config.addition_time_embed_dim and text_encoder_2.config.projection_dim"
            if "requires_aesthetics_score" in self.config and abs(expected - passed) == per_id:
                want = expected < passed  # one id fewer: the aesthetic score replaces the target size
                hint = (f"the unet {'takes' if want else 'does not take'} an aesthetic score: load the pipeline "
                        f"with requires_aesthetics_score={want}")
            raise ValueError(f"the unet's added embedding takes {expected} values but the time ids and pooled text "
                             f"embedding give {passed}; {hint}")
        return torch.tensor([list(values)], dtype=dtype)

    def size_time_ids(self, height: int, width: int, projection_dim: int, dtype: torch.dtype, original_size,
                      crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
                      negative_target_size) -> tuple[torch.Tensor, torch.Tensor]:
        """``(time ids, negative time ids)`` of text-to-image: sizes default to ``height`` x ``width``;
        the negative row is the positive one unless both negative sizes are given."""
        time_ids = self.time_ids((*(original_size or (height, width)), *crops_coords_top_left,
                                  *(target_size or (height, width))), projection_dim, dtype)
        if negative_original_size is None or negative_target_size is None:
            return time_ids, time_ids
        return time_ids, self.time_ids((*negative_original_size, *negative_crops_coords_top_left,
                                        *negative_target_size), projection_dim, dtype)

    def added_conditioning(self, state: CallState, pooled: torch.Tensor, negative_pooled: torch.Tensor | None,
                           time_ids: torch.Tensor, negative_time_ids: torch.Tensor, count: int, device) -> dict:
        """``{"text_embeds", "time_ids"}`` for the UNet, batched as the text embeddings (negative
        half first with guidance; ``count`` images), stored in the call's ``denoiser_kwargs``."""
        if not self.guided(state):
            text, ids = pooled, time_ids.repeat(count, 1)
        elif self._interleaved_time_ids:
            text, ids = torch.cat([negative_pooled, pooled]), torch.cat([negative_time_ids, time_ids]).repeat(count, 1)
        else:
            text = torch.cat([negative_pooled, pooled])
            ids = torch.cat([negative_time_ids.repeat(count, 1), time_ids.repeat(count, 1)])
        added = {"text_embeds": text.to(device), "time_ids": ids.to(device)}
        state.add_conditioning(**added)
        return added

    def after_step(self, state: CallState, step: int, t, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the step callback on ``tensors`` plus ``add_text_embeds`` / ``add_time_ids``; what it
        returns replaces them (the added conditioning in the call's state too)."""
        added = state.denoiser_kwargs[ADDED_COND]
        tensors = self.step_callback(state, step, t, {**tensors, "add_text_embeds": added["text_embeds"],
                                                      "add_time_ids": added["time_ids"]})
        state.add_conditioning(text_embeds=tensors["add_text_embeds"], time_ids=tensors["add_time_ids"])
        return tensors

    # -- output ---------------------------------------------------------------------------------

    def latents_to_output(self, latents: torch.Tensor, output_type: str, generator: Generator = None,
                          dtype: torch.dtype | None = None):
        """Decode (a float16 VAE with ``force_upcast`` decodes in float32, latents are normalised
        with the VAE config's ``latents_mean`` / ``latents_std`` when it has them; see
        :func:`~diffusekit.pipelines.vae_codec.decode_latents`) and convert to ``output_type``;
        ``latent`` returns the latents unchanged. Returns ``(images, None)`` (no safety checker)."""
        if output_type == "latent":
            return latents, None
        image = decode_latents(self.vae, latents, force_upcast=True, use_stats=self._vae_latent_stats)
        return postprocess_images(image, output_type), None

    def _finish_call(self, images, nsfw: None, return_dict: bool):
        """Release offload hooks; :class:`StableDiffusionXLPipelineOutput` (or ``(images,)``)."""
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
