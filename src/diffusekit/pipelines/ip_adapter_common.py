"""Image prompts (IP-Adapter) in the UNet pipelines: :class:`IPAdapterPipelineMixin`.

A pipeline's ``__call__`` takes ``ip_adapter_image`` / ``ip_adapter_image_embeds`` and makes one
call, after encoding the prompt::

    self.add_ip_adapter_conditioning(state, ip_adapter_image, ip_adapter_image_embeds, device,
                                     num_images_per_prompt)

which checks them, encodes the images (transformers' ``CLIPVisionModelWithProjection`` and
``CLIPImageProcessor``, the pipeline's ``image_encoder`` / ``feature_extractor``) and puts the
embeddings into the call's ``denoiser_kwargs["added_cond_kwargs"]["image_embeds"]`` (negative half
first with guidance, as the text embeddings). Nothing is kept on the pipeline: the embeddings are
per call, the scale (``set_ip_adapter_scale``) is pipeline configuration.
"""

from __future__ import annotations

from typing import Any

import torch

from ..loaders.ip_adapter import IPAdapterMixin, loaded_ip_adapters
from ..models.image_projection import ImageProjection
from .call_state import CallState


def check_ip_adapter_inputs(ip_adapter_image: Any, ip_adapter_image_embeds: Any, loaded: int) -> None:
    """ValueError naming the argument when the image prompt does not fit ``loaded`` adapters."""
    given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise ValueError("Provide either `ip_adapter_image` or `ip_adapter_image_embeds`. Cannot leave both "
                         "`ip_adapter_image` and `ip_adapter_image_embeds` defined.")
    if given and not loaded:
        raise ValueError("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter: call load_ip_adapter first")
    if loaded and not given:
        raise ValueError("this pipeline has an IP-Adapter loaded: pass ip_adapter_image or ip_adapter_image_embeds "
                         "(or call unload_ip_adapter())")
    if ip_adapter_image_embeds is not None:
        if not isinstance(ip_adapter_image_embeds, list):
            raise ValueError(f"`ip_adapter_image_embeds` has to be of type `list` but is "
                             f"{type(ip_adapter_image_embeds)}")
        bad = [e.ndim for e in ip_adapter_image_embeds if not torch.is_tensor(e) or e.ndim not in (3, 4)]
        if bad:
            raise ValueError(f"`ip_adapter_image_embeds` has to be a list of 3D or 4D tensors but is {bad[0]}D")
    count = len(ip_adapter_image_embeds if ip_adapter_image is None else _as_list(ip_adapter_image)) if given else 0
    if given and count != loaded:
        name = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
        raise ValueError(f"`{name}` must have same length as the number of IP Adapters. Got {count} entries and "
                         f"{loaded} IP Adapters.")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


class IPAdapterPipelineMixin(IPAdapterMixin):
    """The reference's ``encode_image`` / ``prepare_ip_adapter_image_embeds`` and the one call a
    pipeline makes (:meth:`add_ip_adapter_conditioning`)."""

    def encode_image(self, image: Any, device, num_images_per_prompt: int,
                     output_hidden_states: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings, unconditional embeddings)`` of ``image`` (PIL / arrays through the feature
        extractor, or pixel tensors): projected image embeddings and zeros, or with
        ``output_hidden_states`` the encoder's penultimate hidden states and those of a black image."""
        if self.image_encoder is None:
            raise ValueError("ip_adapter_image needs an image_encoder: load_ip_adapter with an image encoder folder, "
                             "or pass ip_adapter_image_embeds")
        dtype = next(self.image_encoder.parameters()).dtype
        if not isinstance(image, torch.Tensor):
            if self.feature_extractor is None:
                raise ValueError("ip_adapter_image needs a feature_extractor (a CLIPImageProcessor)")
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=dtype)
        if output_hidden_states:
            states, uncond = (self.image_encoder(x, output_hidden_states=True).hidden_states[-2]
                              for x in (image, torch.zeros_like(image)))
            return (states.repeat_interleave(num_images_per_prompt, dim=0),
                    uncond.repeat_interleave(num_images_per_prompt, dim=0))
        embeds = self.image_encoder(image).image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, torch.zeros_like(embeds)

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image: Any, ip_adapter_image_embeds: list | None, device,
                                        num_images_per_prompt: int,
                                        do_classifier_free_guidance: bool) -> list[torch.Tensor]:
        """One ``(batch, images, ...)`` tensor per adapter, repeated per image (negative half first with guidance).
        Given ``ip_adapter_image_embeds`` hold the negative half first when guided, as this returns them."""
        positive, negative = [], []
        if ip_adapter_image_embeds is None:
            layers = self.unet.encoder_hid_proj.image_projection_layers
            for image, layer in zip(_as_list(ip_adapter_image), layers):
                embeds, uncond = self.encode_image(image, device, 1, not isinstance(layer, ImageProjection))
                positive.append(embeds[None])
                negative.append(uncond[None])
        else:
            for embeds in ip_adapter_image_embeds:
                if do_classifier_free_guidance:
                    uncond, embeds = embeds.chunk(2)
                    negative.append(uncond)
                positive.append(embeds)
        result = []
        for i, embeds in enumerate(positive):
            embeds = torch.cat([embeds] * num_images_per_prompt)
            if do_classifier_free_guidance:
                embeds = torch.cat([torch.cat([negative[i]] * num_images_per_prompt), embeds])
            result.append(embeds.to(device=device))
        return result

    def add_ip_adapter_conditioning(self, state: CallState, ip_adapter_image: Any, ip_adapter_image_embeds: Any,
                                    device, num_images_per_prompt: int) -> None:
        """Check the call's image prompt and put its embeddings into the call's UNet conditioning
        (nothing without an adapter and an image prompt)."""
        check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, loaded_ip_adapters(self.unet))
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return
        embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                      num_images_per_prompt, self.guided(state))
        state.add_conditioning(image_embeds=embeds)
