"""IP-Adapter image prompts on the ControlNet pipelines (SD 1.5 and SDXL, text and image-to-image)
against the reference: the IP-Adapter test's tiny pipelines and adapter files, a ControlNet made
from each UNet by the reference (``from_unet``), both libraries loading the same folders."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import diffusekit
from test_ip_adapter import WEIGHT, _close, _image, _load, _run, folders  # noqa: F401 (fixture)

NAMES = {("sd", "text"): "StableDiffusionControlNetPipeline",
         ("sd", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
         ("sd", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
         ("sdxl", "text"): "StableDiffusionXLControlNetPipeline",
         ("sdxl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline"}


@pytest.fixture(scope="module")
def nets(folders, tmp_path_factory):  # noqa: F811
    """{family: ControlNet folder}, each made by the reference from that family's UNet."""
    result = {}
    for family, (folder, _) in folders.items():
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        torch.manual_seed(1)
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        with torch.no_grad():  # zero convs start at zero: give them weights so the residuals matter
            for name, param in net.named_parameters():
                if "zero_conv" in name or "controlnet_mid_block" in name:
                    param.copy_(torch.randn_like(param) * 0.1)
        result[family] = tmp_path_factory.mktemp(f"{family}_net")
        net.save_pretrained(result[family])
    return result


def _controlled_pair(folders, nets, family, task, kind="plain"):  # noqa: F811
    folder, adapters = folders[family]
    pipes = []
    for lib in (diffusekit, diffusers):
        pipe = getattr(lib, NAMES[family, task]).from_pretrained(
            folder, controlnet=lib.ControlNetModel.from_pretrained(nets[family]),
            **({"add_watermarker": False} if lib is diffusers and family == "sdxl" else {}))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(str(adapters[kind]), subfolder="", weight_name=WEIGHT)
        pipe.set_ip_adapter_scale(0.7)
        pipes.append(pipe)
    return pipes


def _inputs(task: str) -> dict:
    control = _image(5, (32, 32))
    if task == "text":
        return dict(image=control, height=32, width=32)
    extra = {"mask_image": _image(6, (32, 32)).convert("L")} if task == "inpaint" else {}
    return dict(image=_image(1, (32, 32)), control_image=control, strength=0.8, height=32, width=32, **extra)


@pytest.mark.parametrize("family,task", sorted(NAMES))
def test_controlnet_pipelines_take_image_prompts(folders, nets, family, task):  # noqa: F811
    ours, ref = _controlled_pair(folders, nets, family, task)
    kwargs = dict(ip_adapter_image=_image(), **_inputs(task))
    out = _run(ours, **kwargs)
    _close(out, _run(ref, **kwargs))
    ours.set_ip_adapter_scale(0.0)  # the image prompt really steers: scale 0 differs
    assert float(np.abs(_run(ours, **kwargs) - out).max()) > 1e-3


def test_plus_adapter_and_image_embeds_on_sdxl_controlnet(folders, nets):  # noqa: F811
    ours, ref = _controlled_pair(folders, nets, "sdxl", "text", kind="plus")
    kwargs = dict(ip_adapter_image=_image(), **_inputs("text"))
    out = _run(ours, **kwargs)
    _close(out, _run(ref, **kwargs))
    embeds = ours.prepare_ip_adapter_image_embeds(_image(), None, torch.device("cpu"), 1, True)
    np.testing.assert_array_equal(_run(ours, ip_adapter_image_embeds=embeds, **_inputs("text")), out)
