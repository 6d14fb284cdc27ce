"""Pipeline-level FreeU and fused q/k/v projections (pipelines/unet_options.py)."""

import pytest
import torch

from diffusekit import StableDiffusionPipeline
from sd_components import save_tiny_sd_folder


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("tokenizer"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe) -> torch.Tensor:
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_freeu_changes_the_image_and_disabling_restores_it(pipe):
    plain = _run(pipe)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        assert not torch.allclose(_run(pipe), plain, atol=1e-4)
    finally:
        pipe.disable_freeu()
    assert torch.equal(_run(pipe), plain)


def test_fused_projections_keep_the_image(pipe):
    plain = _run(pipe)
    pipe.fuse_qkv_projections()
    try:
        assert hasattr(pipe.vae.decoder.mid_block.attentions[0], "to_qkv")
        torch.testing.assert_close(_run(pipe), plain, rtol=1e-4, atol=1e-4)
    finally:
        pipe.unfuse_qkv_projections()
    assert not hasattr(pipe.vae.decoder.mid_block.attentions[0], "to_qkv")


def test_options_need_the_component(pipe):
    bare = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=pipe.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="The pipeline must have `unet` for using FreeU."):
        bare.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(ValueError, match="must have `vae` for using fused projections"):
        bare.fuse_qkv_projections(unet=False)
