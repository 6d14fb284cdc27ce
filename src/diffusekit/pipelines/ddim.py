"""DDIMPipeline: unconditional generation with the deterministic (eta=0) or stochastic DDIM sampler."""

from __future__ import annotations

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


class DDIMPipeline(DiffusionPipeline):
    """Denoising diffusion implicit models (Song et al., 2021) on a pixel-space UNet2DModel.

    Any scheduler config is accepted and converted to a DDIMScheduler, as the reference does.
    """

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        from ..schedulers.ddim import DDIMScheduler

        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps, eta=eta)
        image = initial_noise(image_shape(self.unet, batch_size), generator, self.device, self.unet.dtype)
        scheduler = self.scheduler.for_call()
        scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(scheduler.timesteps):
            noise_pred = self.unet(image, t).sample
            image = scheduler.step(
                noise_pred, t, image, eta=eta, use_clipped_model_output=use_clipped_model_output, generator=generator
            ).prev_sample
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
