"""LDMPipeline: unconditional latent diffusion, denoising in a VQ-VAE's latent space (CompVis/ldm-celebahq-256)."""

from __future__ import annotations

import inspect

import torch

from ..utils import Generator
from .call_checks import check_call_arguments
from .image_processing import postprocess_images
from .noise import image_shape, initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput


def step_options(scheduler, eta: float, generator: Generator) -> dict:
    """The ``eta`` and ``generator`` arguments that this scheduler's ``step`` accepts.

    The reference passes only ``eta``, so DDIM with ``eta > 0`` draws its noise from the global RNG
    there; passing the generator makes a seed reproduce the whole sample.
    """
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}


def decode_vq_latents(vqvae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent scaling and decode with the VQ (or KL) autoencoder; images in [-1, 1]."""
    return vqvae.decode(latents / vqvae.config.scaling_factor).sample


class LDMPipeline(DiffusionPipeline):
    """Latent diffusion (Rombach et al., 2022) without conditioning: ``unet`` denoises VQ latents,
    ``vqvae`` decodes them. Usually run with a DDIMScheduler; ``eta`` goes to schedulers that take it.
    """

    def __init__(self, vqvae, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        check_call_arguments(batch_size=batch_size, num_inference_steps=num_inference_steps, eta=eta)
        scheduler = self.scheduler.for_call()
        latents = initial_noise(image_shape(self.unet, batch_size), generator, self.device, self.unet.dtype,
                                scale=scheduler.init_noise_sigma)
        scheduler.set_timesteps(num_inference_steps)
        options = step_options(scheduler, eta, generator)
        for t in self.progress_bar(scheduler.timesteps):
            noise_pred = self.unet(scheduler.scale_model_input(latents, t), t).sample
            latents = scheduler.step(noise_pred, t, latents, **options).prev_sample
        images = postprocess_images(decode_vq_latents(self.vqvae, latents), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
