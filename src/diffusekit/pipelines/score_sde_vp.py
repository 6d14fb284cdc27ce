"""ScoreSdeVpPipeline: sampling the variance-preserving score SDE with a ScoreSdeVpScheduler.

The reference ships the scheduler but no pipeline; this one follows the other score-SDE pipeline.
"""

from __future__ import annotations

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


class ScoreSdeVpPipeline(DiffusionPipeline):
    """Euler-Maruyama on the reverse VP SDE (Song et al., 2021), continuous time t from 1 to ``sampling_eps``.

    ``unet`` predicts the noise (epsilon) of a sample at time t, like a DDPM model; the scheduler
    turns it into the score ``-epsilon / std(t)``. The unet's timestep is
    ``t * (scheduler.config.num_train_timesteps - 1)``, the discrete-time label of score_sde's VP
    models. The result is the last step's noise-free mean, with data assumed in [-1, 1];
    ``output_type="latent"`` returns it unscaled and unclamped.
    """

    #: The reference has no such pipeline: model_index.json names this class, and the reference
    #: loads the folder's components one by one (UNet2DModel, ScoreSdeVpScheduler).
    _reference_class_name = None

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps)
        sample = initial_noise(image_shape(self.unet, batch_size), generator, self.device, self.unet.dtype)
        scheduler = self.scheduler.for_call()
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        label_scale = scheduler.config.num_train_timesteps - 1
        ones = torch.ones(batch_size, device=self.device, dtype=sample.dtype)
        sample_mean = sample
        for t in self.progress_bar(scheduler.timesteps):
            t_batch = t * ones
            noise_pred = self.unet(sample, t_batch * label_scale).sample
            sample, sample_mean = scheduler.step_pred(noise_pred, sample, t_batch, generator=generator)
        if output_type == "latent":
            images = sample_mean
        else:
            images = postprocess_images(sample_mean, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
