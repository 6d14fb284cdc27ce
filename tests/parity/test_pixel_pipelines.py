"""DDPM, DDIM and PNDM pipelines against the reference, on a tiny UNet the reference saves."""

import json

import diffusers
import numpy as np
import pytest
import torch

import diffusekit


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(folder / "unet")
    return folder


def _pair(name, folder, scheduler_name, **scheduler_config):
    pipes = []
    for lib in (diffusekit, diffusers):
        unet = lib.UNet2DModel.from_pretrained(folder / "unet")
        scheduler = getattr(lib, scheduler_name)(**scheduler_config)
        pipe = getattr(lib, name)(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


def _run(pipe, **kwargs):
    return pipe(output_type="np", generator=torch.Generator().manual_seed(7), **kwargs).images


def test_ddpm_pipeline_matches(unet_folder):
    ours, ref = _pair("DDPMPipeline", unet_folder, "DDPMScheduler", num_train_timesteps=100)
    np.testing.assert_allclose(_run(ours, num_inference_steps=10, batch_size=2),
                               _run(ref, num_inference_steps=10, batch_size=2), atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_matches(unet_folder, eta):
    ours, ref = _pair("DDIMPipeline", unet_folder, "DDIMScheduler")
    np.testing.assert_allclose(_run(ours, num_inference_steps=8, eta=eta, batch_size=2),
                               _run(ref, num_inference_steps=8, eta=eta, batch_size=2), atol=1e-4)


def test_pndm_pipeline_matches(unet_folder):
    ours, ref = _pair("PNDMPipeline", unet_folder, "PNDMScheduler")
    np.testing.assert_allclose(_run(ours, num_inference_steps=8), _run(ref, num_inference_steps=8), atol=1e-4)


def test_generator_list_gives_per_item_noise(unet_folder):
    ours, ref = _pair("DDIMPipeline", unet_folder, "DDIMScheduler")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    a = ours(batch_size=2, generator=gens(), num_inference_steps=4, output_type="np").images
    b = ref(batch_size=2, generator=gens(), num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="generator"):
        ours(batch_size=3, generator=gens(), num_inference_steps=2)


def test_saved_here_loads_in_reference_and_back(unet_folder, tmp_path):
    ours, ref = _pair("DDIMPipeline", unet_folder, "DDIMScheduler")
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    from_ref = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours")
    from_ref.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(from_ref, num_inference_steps=4), _run(ours, num_inference_steps=4), atol=1e-4)

    ref.save_pretrained(tmp_path / "ref")
    again = diffusekit.DiffusionPipeline.from_pretrained(tmp_path / "ref")
    assert type(again).__name__ == "DDIMPipeline"
    again.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(again, num_inference_steps=4), _run(ref, num_inference_steps=4), atol=1e-4)
