"""DDPMPipeline: unconditional image generation with a pixel-space UNet2DModel."""

from __future__ import annotations

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


class DDPMPipeline(DiffusionPipeline):
    """Denoising diffusion (Ho et al., 2020): ``unet`` predicts the noise, ``scheduler`` removes it."""

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps)
        image = initial_noise(image_shape(self.unet, batch_size), generator, self.device, self.unet.dtype)
        scheduler = self.scheduler.for_call()
        scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(scheduler.timesteps):
            noise_pred = self.unet(image, t).sample
            image = scheduler.step(noise_pred, t, image, generator=generator).prev_sample
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
