"""KarrasVePipeline: the stochastic sampler of Karras et al. (2022, algorithm 2) with a KarrasVeScheduler."""

from __future__ import annotations

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


class KarrasVePipeline(DiffusionPipeline):
    """Second-order (Heun) stochastic sampling of a variance-exploding ``unet``.

    At each noise level the scheduler first "churns" (adds noise to raise sigma to sigma_hat, as its
    config's ``s_churn``, ``s_noise``, ``s_min`` and ``s_max`` say), then takes an Euler step and a
    Heun correction. The unet sees inputs in [0, 1] and sigma / 2, as the reference scales them.
    """

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _denoiser_output(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        return (sigma / 2) * self.unet((sample + 1) / 2, sigma / 2).sample

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps)
        shape = image_shape(self.unet, batch_size)
        scheduler = self.scheduler.for_call()
        sample = initial_noise(shape, generator, self.device, self.unet.dtype, scale=scheduler.init_noise_sigma)
        scheduler.set_timesteps(num_inference_steps)
        schedule = scheduler.schedule
        for t in self.progress_bar(scheduler.timesteps):
            sigma = schedule[t]
            sigma_prev = schedule[t - 1] if t > 0 else 0
            sample_hat, sigma_hat = scheduler.add_noise_to_input(sample, sigma, generator=generator)
            step = scheduler.step(self._denoiser_output(sample_hat, sigma_hat), sigma_hat, sigma_prev, sample_hat)
            if sigma_prev != 0:
                correction = self._denoiser_output(step.prev_sample, sigma_prev)
                step = scheduler.step_correct(correction, sigma_hat, sigma_prev, sample_hat,
                                                   step.prev_sample, step.derivative)
            sample = step.prev_sample
        images = postprocess_images(sample, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
