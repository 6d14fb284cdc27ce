"""DiffusionPipeline behaviour on a tiny DDPM pipeline built with diffusekit alone."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_output_types_and_tuple(pipe):
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    images = pipe(**kwargs).images
    assert isinstance(images[0], Image.Image) and images[0].size == (8, 8)
    array = pipe(output_type="np", **{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    assert array.shape == (1, 8, 8, 3) and 0 <= array.min() and array.max() <= 1
    tensor = pipe(output_type="pt", **{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    (first,) = pipe(return_dict=False, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert len(first) == 1
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg", num_inference_steps=1)


def test_components_device_dtype_repr(pipe):
    assert set(pipe.components) == {"unet", "scheduler"}
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    pipe.to(torch.float64)
    assert pipe.dtype == torch.float64 and pipe.unet.dtype == torch.float64
    assert "DDPMPipeline" in repr(pipe) and '"UNet2DModel"' in repr(pipe)
    other = diffusekit.DDIMPipeline(**pipe.components)
    assert isinstance(other.scheduler, DDIMScheduler)


def test_save_load_with_dtype_and_override(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert isinstance(loaded, DDPMPipeline) and loaded.unet.dtype == torch.float16
    swapped = DiffusionPipeline.from_pretrained(tmp_path, scheduler=DDIMScheduler())
    assert isinstance(swapped.scheduler, DDIMScheduler)
    with pytest.raises(TypeError, match="not_an_option"):
        DiffusionPipeline.from_pretrained(tmp_path, not_an_option=1)
