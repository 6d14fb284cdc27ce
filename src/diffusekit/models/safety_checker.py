"""StableDiffusionSafetyChecker: flags images close to banned CLIP concepts and blacks them out.

Like the reference it is a transformers ``PreTrainedModel`` over a ``CLIPConfig`` (its folder holds a
transformers ``config.json`` and ``model.safetensors``), with the reference's parameter names, so
checkpoints load either way. model_index.json names it ``["stable_diffusion", "StableDiffusionSafetyChecker"]``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

logger = logging.getLogger(__name__)

#: Added to every concept score of an image that matched a "special care" concept.
SPECIAL_CARE_ADJUSTMENT = 0.01


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) cosine similarities."""
    return nn.functional.normalize(a) @ nn.functional.normalize(b).t()


class StableDiffusionSafetyChecker(PreTrainedModel):
    """CLIP image embedding compared with 17 concept and 3 "special care" embeddings.

    An image is flagged when ``round(cos(image, concept) - threshold + adjustment, 3) > 0`` for
    some concept, where the thresholds are ``concept_embeds_weights`` and the adjustment is 0.01 if
    any ``round(cos(image, special) - special_threshold, 3) > 0``, else 0.
    """

    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]
    model_index_library = "stable_diffusion"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        dim = config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(17, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)
        self.post_init()

    def concept_flags(self, clip_input: torch.Tensor) -> list[bool]:
        """One flag per image of ``clip_input`` (CLIP-preprocessed pixels, N x 3 x H x W)."""
        pooled = self.vision_model(clip_input.to(self.dtype))[1]
        image_embeds = self.visual_projection(pooled)
        # scores in float32 numpy, rounded to 3 decimals, as the reference computes them
        special = cosine_similarity_matrix(image_embeds, self.special_care_embeds).cpu().float().numpy()
        concept = cosine_similarity_matrix(image_embeds, self.concept_embeds).cpu().float().numpy()
        special_thresholds = self.special_care_embeds_weights.detach().cpu().float().numpy()
        concept_thresholds = self.concept_embeds_weights.detach().cpu().float().numpy()
        special_care = (np.round(special - special_thresholds, 3) > 0).any(axis=1)
        adjustment = np.where(special_care, np.float32(SPECIAL_CARE_ADJUSTMENT), np.float32(0.0)).astype(np.float32)
        scores = np.round(concept - concept_thresholds + adjustment[:, None], 3)
        return [bool(flag) for flag in (scores > 0).any(axis=1)]

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images: torch.Tensor | np.ndarray):
        """Return ``(images with flagged ones set to 0, flags)``; ``images`` is not modified."""
        flags = self.concept_flags(clip_input)
        if any(flags):
            if torch.is_tensor(images):
                images = images.clone()
            elif isinstance(images, np.ndarray):
                images = images.copy()
            else:
                images = list(images)
            for index, flagged in enumerate(flags):
                if flagged:
                    images[index] = (torch.zeros_like(images[index]) if torch.is_tensor(images[index])
                                     else np.zeros(images[index].shape))
            logger.warning(
                "Potential NSFW content was detected in one or more images. A black image will be returned "
                "instead. Try again with a different prompt and/or seed."
            )
        return images, flags
