"""LDMTextToImagePipeline: latent diffusion guided by LDM-BERT text embeddings (CompVis/ldm-text2im-large-256)."""

from __future__ import annotations

import torch

from ..utils import Generator
from .call_checks import check_call_arguments, check_image_size, check_prompt_text
from .image_processing import postprocess_images
from .ldm import decode_vq_latents, step_options
from .noise import initial_noise
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from .prompt_encoding import tokenize


class LDMTextToImagePipeline(DiffusionPipeline):
    """Text-to-image latent diffusion with classifier-free guidance.

    Components: ``vqvae`` (VQModel or AutoencoderKL), ``bert`` (LDMBertModel), ``tokenizer``
    (transformers BertTokenizer), ``unet`` (UNet2DConditionModel) and a DDIM, PNDM or LMS
    ``scheduler``. Prompts are padded to the text encoder's ``max_position_embeddings`` (77) tokens.
    """

    def __init__(self, vqvae, bert, tokenizer, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # 8 without a vqvae (a pipeline built for its text encoder only), as the reference
        self.vae_scale_factor = 2 ** (len(vqvae.config.block_out_channels) - 1) if vqvae is not None else 8

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """LDM-BERT embeddings (batch, tokens, d_model) of the prompts, padded to full length."""
        tokens = tokenize(self.tokenizer, prompts, self.bert.config.max_position_embeddings, warn=False)
        return self.bert(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate one image per prompt; ``guidance_scale`` > 1 enables classifier-free guidance."""
        check_call_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta)
        if prompt is None:
            raise ValueError("prompt is required")
        check_prompt_text("prompt", prompt)
        prompt = [prompt] if isinstance(prompt, str) else prompt
        factor = self.vae_scale_factor
        check_image_size(height, width, multiple=factor)
        height = self.unet.config.sample_size * factor if height is None else height
        width = self.unet.config.sample_size * factor if width is None else width

        batch_size = len(prompt)
        guided = guidance_scale != 1.0
        context = self._text_embeddings(prompt)
        if guided:
            context = torch.cat([self._text_embeddings([""] * batch_size), context])
        shape = (batch_size, self.unet.config.in_channels, height // factor, width // factor)
        scheduler = self.scheduler.for_call()
        latents = initial_noise(shape, generator, self.device, context.dtype, latents,
                                scale=scheduler.init_noise_sigma)

        scheduler.set_timesteps(num_inference_steps)
        options = step_options(scheduler, eta, generator)
        for t in self.progress_bar(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=context).sample
            if guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, **options).prev_sample
        images = postprocess_images(decode_vq_latents(self.vqvae, latents), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
