"""Pipeline-level API every pipeline has, as in the reference: attention slicing."""

import torch

from diffusekit import DDPMPipeline, DDPMScheduler, UNet2DModel


class _Sliced(UNet2DModel):
    """Records the slice sizes it is given."""

    def set_attention_slice(self, slice_size):
        self.slices = [*getattr(self, "slices", []), slice_size]


def test_attention_slicing_reaches_models_of_any_pipeline():
    torch.manual_seed(0)
    unet = _Sliced(sample_size=8, block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.enable_attention_slicing()
    pipe.enable_attention_slicing(2)
    pipe.disable_attention_slicing()
    assert unet.slices == ["auto", 2, None]


def test_ldm_pipeline_builds_without_its_vqvae():
    from diffusekit import LDMTextToImagePipeline

    pipe = LDMTextToImagePipeline(vqvae=None, bert=None, tokenizer=None, unet=None, scheduler=None)
    assert pipe.vae_scale_factor == 8


def test_from_pretrained_logs_each_loaded_component(tmp_path, caplog):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="diffusekit.pipelines.pipeline_utils"):
        DDPMPipeline.from_pretrained(tmp_path)
    assert f"Loaded unet as UNet2DModel from `unet` subfolder of {tmp_path}." in caplog.text
    assert "Loaded scheduler as DDPMScheduler from `scheduler` subfolder" in caplog.text
