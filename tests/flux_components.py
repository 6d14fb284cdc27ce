"""Tiny FLUX.1 parts shared by the parity and the pipeline tests: transformer, FLUX-style VAE and
scheduler configs (plain dicts, for diffusekit's classes and the reference's alike), and a tiny T5
encoder with its tokenizer."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                          axes_dims_rope=(4, 4, 8))
VAE_CONFIG = dict(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                  scaling_factor=1.5035)
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096)
T5_WORDS = ["a", "the", "cat", "dog", "photo", "of", "red", "blue", "sky", "painting", "blurry", "ugly"]


def tiny_t5_tokenizer() -> transformers.T5TokenizerFast:
    """A Unigram (sentencepiece-style) T5 tokenizer over a few words and the letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    pieces += [("\u2581" + w, -1.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512, extra_ids=0)


def tiny_t5(vocab_size: int) -> transformers.T5EncoderModel:
    config = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(1)
    return transformers.T5EncoderModel(config).eval()


def tiny_flux_pipeline(tokenizer_folder, **transformer_options):
    """diffusekit's FluxPipeline on these tiny parts (seed 0; ``transformer_options`` change
    TRANSFORMER_CONFIG), progress bar off."""
    from diffusekit import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from sd_components import tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer(tokenizer_folder)
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=AutoencoderKL(**VAE_CONFIG).eval(),
                        text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2,
                        transformer=FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **transformer_options}).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe
