"""A diffusekit pipeline with SDXL's components and loader mixins but no ``__call__``: what the loader
tests need until diffusekit's own SDXL pipelines land (they have the same components)."""

from diffusekit import DiffusionPipeline
from diffusekit.loaders.lora import LoraLoaderMixin
from diffusekit.loaders.single_file import FromSingleFileMixin
from diffusekit.loaders.textual_inversion import TextualInversionLoaderMixin


class SDXLStandIn(DiffusionPipeline, LoraLoaderMixin, TextualInversionLoaderMixin, FromSingleFileMixin):
    """The components and loader mixins an SDXL pipeline has (the refiner's text_encoder/tokenizer: None)."""

    _optional_components = ("tokenizer", "text_encoder")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                requires_aesthetics_score=requires_aesthetics_score)
