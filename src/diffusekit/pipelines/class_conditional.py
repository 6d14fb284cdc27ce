"""ClassConditionalPipeline: class-conditional generation with classifier-free guidance."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ..utils import Generator
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


class ClassConditionalPipeline(DiffusionPipeline):
    """A pixel-space UNet2DModel conditioned on class labels (``num_class_embeds``) and any scheduler.

    The UNet's last class index is the learned *null class* (the "no label" embedding seen during
    training when labels were dropped), so a model for ``n`` classes has ``num_class_embeds = n + 1``.
    Classifier-free guidance mixes the two predictions: ``uncond + scale * (cond - uncond)``.

    Saved folders name ``DDIMPipeline`` as their class (and this class under
    ``_diffusekit_class_name``), so the reference library can load them too.
    """

    _reference_class_name = "DDIMPipeline"

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        if getattr(unet.config, "num_class_embeds", None) is None or unet.config.num_class_embeds < 2:
            raise ValueError("ClassConditionalPipeline needs a UNet with num_class_embeds >= 2 "
                             "(the classes plus the null class)")
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class excluded)."""
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1

    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten().cpu()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1}, got {bad.tolist()}")
        return labels.to(self.device)

    def _predict(self, sample: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The guided model output for ``sample`` at timestep ``t``."""
        if guidance_scale == 1.0:
            return self.unet(sample, t, class_labels=labels).sample
        both = torch.cat([sample, sample])
        null = torch.full_like(labels, self.null_class)
        cond, uncond = self.unet(both, t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 50,
        generator: Generator = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """One image per entry of ``class_labels``. ``guidance_scale`` 1 turns guidance off, 0 is unconditional."""
        labels = self._labels(class_labels)
        shape = image_shape(self.unet, labels.shape[0])
        scale = float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        image = initial_noise(shape, generator, self.device, self.unet.dtype, latents=latents, scale=scale)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        step_options = {"generator": generator}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_options["eta"] = eta
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(image, t)
            prediction = self._predict(model_input, t, labels, guidance_scale)
            image = self.scheduler.step(prediction, t, image, **step_options).prev_sample
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
