"""ScoreSdeVePipeline: predictor-corrector sampling of the variance-exploding score SDE (NCSN++ models)."""

from __future__ import annotations

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


class ScoreSdeVePipeline(DiffusionPipeline):
    """Score-based generation through the VE SDE (Song et al., 2021) with a ScoreSdeVeScheduler.

    Each step runs ``scheduler.config.correct_steps`` Langevin corrector steps (step size set by the
    config's ``snr``) and one reverse-diffusion predictor step. ``unet`` (an NCSN++ UNet2DModel)
    takes the noise level sigma as its timestep and returns the score. Images live in [0, 1].
    """

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 2000,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps)
        shape = image_shape(self.unet, batch_size)
        scheduler = self.scheduler.for_call()
        sample = initial_noise(shape, generator, self.device, self.unet.dtype, scale=scheduler.init_noise_sigma)
        scheduler.set_timesteps(num_inference_steps)
        scheduler.set_sigmas(num_inference_steps)
        ones = torch.ones(batch_size, device=self.device)
        sample_mean = sample
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            sigma = scheduler.sigmas[i] * ones
            for _ in range(scheduler.config.correct_steps):
                score = self.unet(sample, sigma).sample
                sample = scheduler.step_correct(score, sample, generator=generator).prev_sample
            score = self.unet(sample, sigma).sample
            step = scheduler.step_pred(score, t, sample, generator=generator)
            sample, sample_mean = step.prev_sample, step.prev_sample_mean
        images = postprocess_images(sample_mean, output_type, from_minus_one=False)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
