"""``from_single_file`` builds the components the pipeline class takes (depth-to-image has no safety
checker), and a model loads its part by its ``single_file_component``, not by its class name."""

import pytest
import torch

from diffusekit import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusekit.loaders import single_file
from diffusekit.loaders.single_file_model import PARTS
from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer


@pytest.fixture(scope="module")
def depth_checkpoint(tmp_path_factory):
    """(pipeline folder, original-layout file) of a tiny SD pipeline with a 5-channel (depth) UNet."""
    folder = tmp_path_factory.mktemp("sd")
    tokenizer = tiny_tokenizer(folder / "tok")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**dict(UNET_CONFIG, in_channels=5)),
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe", single_file.convert(folder / "pipe", folder / "model.safetensors")


def test_depth2img_from_single_file_takes_only_its_components(depth_checkpoint):
    folder, path = depth_checkpoint
    pipe = StableDiffusionDepth2ImgPipeline.from_single_file(path, config=folder)
    assert type(pipe) is StableDiffusionDepth2ImgPipeline
    assert pipe.depth_estimator is None and pipe.feature_extractor is None
    assert not hasattr(pipe, "safety_checker")
    assert pipe.unet.config.in_channels == 5
    expected = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    loaded = pipe.unet.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="pass depth_map"):
        pipe("a cat", image=image, num_inference_steps=1)
    out = pipe("a cat", image=image, depth_map=torch.rand(1, 32, 32), num_inference_steps=2, strength=1.0,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


def test_given_components_are_not_loaded(depth_checkpoint):
    folder, path = depth_checkpoint
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    pipe = StableDiffusionPipeline.from_single_file(path, config=folder, vae=vae)
    assert pipe.vae is vae and pipe.safety_checker is None and pipe.config.requires_safety_checker is False


def test_models_load_their_part_by_component_not_class_name(depth_checkpoint):
    folder, path = depth_checkpoint

    class MyUNet(UNet2DConditionModel):
        pass

    unet = MyUNet.from_single_file(path, config=folder / "unet")
    assert type(unet) is MyUNet and unet.config.in_channels == 5
    vae = AutoencoderKL.from_single_file(path, config=folder, subfolder="vae")
    expected = AutoencoderKL.from_pretrained(folder / "vae").state_dict()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in expected.items())
    assert {UNet2DConditionModel.single_file_component, AutoencoderKL.single_file_component,
            ControlNetModel.single_file_component} == set(PARTS)
