"""``generate --controlnet``: the ControlNet pipeline of the task, the same image as the API call,
Canny preprocessing, several nets, the PNG record (A1111 fields too), ``--from``, and errors that
name the option."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusekit import (
    AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from diffusekit.cli import main, read_png_parameters
from diffusekit.control_preprocess import canny
from controlnet_files import original_controlnet_state
from controlnet_parts import random_controlnet, randomized
from sd_components import save_tiny_sd_folder
from sdxl_pipeline_parts import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, text_encoders, tiny_tokenizer


def _controlnet(seed: int) -> ControlNetModel:
    return random_controlnet(ControlNetModel, seed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folders: base, net a, net b, control images; the base pipeline; the two nets)."""
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder, text_encoder_2 = text_encoders(tokenizer)
    torch.manual_seed(0)
    base = StableDiffusionXLPipeline(vae=AutoencoderKL(**VAE_CONFIG).eval(), text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=UNet2DConditionModel(**UNET_CONFIG).eval(),
                                     scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))
    folder = tmp_path_factory.mktemp("models")
    base.save_pretrained(folder / "base")
    nets = _controlnet(1), _controlnet(2)
    for name, net in zip("ab", nets):
        net.save_pretrained(folder / f"net-{name}")
    square = np.zeros((32, 32, 3), dtype=np.uint8)
    square[8:24, 8:24] = (250, 200, 40)
    Image.fromarray(square).save(folder / "square.png")
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "noise.png")
    return folder, base, nets


def _generate(capsys, *args):
    assert main(["generate", *map(str, args)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.split()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _api(pipe_cls, base, nets, **kwargs):
    pipe = pipe_cls(**base.components, controlnet=nets)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(prompt="a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                           **kwargs).images[0])


def test_one_net_with_canny_matches_the_api_and_is_recorded(setup, tmp_path, capsys):
    folder, base, nets = setup
    (png,) = _generate(capsys, folder / "base", "--prompt", "a cat", "--steps", "2", "--seed", "5",
                       "--controlnet", folder / "net-a", "--control-image", folder / "square.png",
                       "--control-preprocess", "canny", "--control-scale", "0.8", "--out", tmp_path)
    record = read_png_parameters(png)
    assert record["pipeline"] == "StableDiffusionXLControlNetPipeline"
    (entry,) = record["controlnets"]
    assert entry["path"] == str((folder / "net-a").resolve())
    assert entry["image"]["path"] == str((folder / "square.png").resolve()) and len(entry["image"]["sha256"]) == 64
    assert (entry["preprocess"], entry["scale"], entry["start"], entry["end"]) == ("canny", 0.8, 0.0, 1.0)
    edges = canny(Image.open(folder / "square.png"))
    expected = _api(StableDiffusionXLControlNetPipeline, base, nets[0], image=edges, controlnet_conditioning_scale=0.8)
    np.testing.assert_array_equal(_pixels(png), expected)
    text = Image.open(png).text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: net-a, Weight: 0.8, Guidance Start: 0.0, Guidance End: 1.0"' in text

    (again,) = _generate(capsys, "--from", png, "--out", tmp_path / "again")
    np.testing.assert_array_equal(_pixels(again), _pixels(png))


def test_two_nets_from_an_image(setup, tmp_path, capsys):
    folder, base, nets = setup
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    (png,) = _generate(capsys, folder / "base", "--prompt", "a cat", "--steps", "2", "--seed", "5",
                       "--image", tmp_path / "in.png", "--strength", "1.0",
                       "--controlnet", folder / "net-a", "--control-image", folder / "square.png",
                       "--controlnet", folder / "net-b", "--control-image", folder / "noise.png",
                       "--control-scale", "0.5", "--control-scale", "1.5", "--control-preprocess", "canny",
                       "--control-preprocess", "none", "--control-start", "0.5", "--out", tmp_path)
    record = read_png_parameters(png)
    assert record["pipeline"] == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert [(e["preprocess"], e["scale"], e["start"]) for e in record["controlnets"]] == [("canny", 0.5, 0.5),
                                                                                          ("none", 1.5, 0.5)]
    controls = [canny(Image.open(folder / "square.png")), Image.open(folder / "noise.png").convert("RGB")]
    expected = _api(StableDiffusionXLControlNetImg2ImgPipeline, base, list(nets), image=Image.open(tmp_path / "in.png"),
                    strength=1.0, control_image=controls, controlnet_conditioning_scale=[0.5, 1.5],
                    control_guidance_start=0.5)
    np.testing.assert_array_equal(_pixels(png), expected)
    assert "ControlNet 1: \"Module: none, Model: net-b, Weight: 1.5" in Image.open(png).text["parameters"]


def test_one_scale_applies_to_every_net(setup, tmp_path, capsys):
    folder, base, nets = setup
    (png,) = _generate(capsys, folder / "base", "--prompt", "a cat", "--steps", "2", "--seed", "5",
                       "--controlnet", folder / "net-a", "--control-image", folder / "noise.png",
                       "--controlnet", folder / "net-b", "--control-image", folder / "square.png",
                       "--control-scale", "0.3", "--control-end", "0.5", "--out", tmp_path)
    assert [(e["scale"], e["end"]) for e in read_png_parameters(png)["controlnets"]] == [(0.3, 0.5)] * 2
    controls = [Image.open(folder / name).convert("RGB") for name in ("noise.png", "square.png")]
    expected = _api(StableDiffusionXLControlNetPipeline, base, list(nets), image=controls,
                    controlnet_conditioning_scale=[0.3, 0.3], control_guidance_end=0.5)
    np.testing.assert_array_equal(_pixels(png), expected)


@pytest.mark.parametrize("extra, message", [
    (["--controlnet", "{a}"], "--control-image is given 0 times but --controlnet 1 times; give one control image "
                              "per ControlNet"),
    (["--controlnet", "{a}", "--control-image", "{img}", "--control-image", "{img}"],
     "--control-image is given 2 times but --controlnet 1 times"),
    (["--control-scale", "0.5"], "--control-scale needs --controlnet (the net that reads the control image)"),
    (["--control-image", "{img}", "--control-end", "0.5"], "--control-image, --control-end need --controlnet"),
    (["--controlnet", "{a}", "--control-image", "{img}", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale is given 2 times for 1 ControlNets; give it once (for all) or once per --controlnet"),
    (["--controlnet", "{a}", "--control-image", "{img}", "--control-start", "0.6", "--control-end", "0.4"],
     "--control-start (0.6) and --control-end (0.4) must satisfy 0 <= start < end <= 1"),
    (["--controlnet", "{a}", "--control-image", "{img}", "--control-preprocess", "sobel"],
     "--control-preprocess sobel: unknown; choose one of canny, none"),
    (["--controlnet", "{a}", "--control-image", "{missing}"], "--control-image {missing}: no such file"),
    (["--controlnet", "{missing}", "--control-image", "{img}"], "--controlnet"),
    (["--controlnet", "{a}", "--control-image", "{img}", "--image", "{img}", "--mask", "{img}"],
     "--controlnet with --mask: there is no SDXL ControlNet inpainting pipeline"),
], ids=["no-image", "two-images", "scale-alone", "image-alone", "scale-count", "window", "preprocess",
        "missing-image", "missing-net", "sdxl-inpaint"])
def test_errors_name_the_option(setup, tmp_path, capsys, extra, message):
    folder = setup[0]
    names = dict(a=folder / "net-a", img=folder / "square.png", missing=tmp_path / "missing.png")
    extra = [e.format(**names) for e in extra]
    assert main(["generate", str(folder / "base"), "--prompt", "a", "--out", str(tmp_path), *extra]) == 2
    assert f"error: {message.format(**names)}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_a_model_without_controlnets_is_named(setup, tmp_path, capsys):
    folder = setup[0]
    assert main(["generate", "--controlnet", str(folder / "net-a"), "--control-image", str(folder / "square.png"),
                 "--out", str(tmp_path)]) == 2
    assert "--controlnet: ClassConditionalPipeline is not a Stable Diffusion or SDXL pipeline" in capsys.readouterr().err


def test_sd_tasks_follow_the_inputs(tmp_path, capsys):
    """A Stable Diffusion 1.x model: the SD ControlNet pipeline of each task (text, image, inpainting)."""
    from diffusekit import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    model = save_tiny_sd_folder(tmp_path / "sd", tmp_path / "tokenizer")
    base = StableDiffusionPipeline.from_pretrained(model)
    torch.manual_seed(3)
    net = randomized(ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8)))
    net.save_pretrained(tmp_path / "net")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    common = ["--prompt", "a cat", "--steps", "2", "--seed", "5", "--controlnet", tmp_path / "net",
              "--control-image", tmp_path / "in.png", "--control-preprocess", "canny", "--out", tmp_path / "out"]
    (text_png,) = _generate(capsys, model, *common)
    (image_png,) = _generate(capsys, model, *common, "--image", tmp_path / "in.png")
    (inpaint_png,) = _generate(capsys, model, *common, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png")
    assert [read_png_parameters(png)["pipeline"] for png in (text_png, image_png, inpaint_png)] == [
        "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline"]
    expected = _api(StableDiffusionControlNetPipeline, base, net, image=canny(Image.open(tmp_path / "in.png")))
    np.testing.assert_array_equal(_pixels(text_png), expected)

    # the net as one original-layout file, its config beside it
    single = tmp_path / "single"
    single.mkdir()
    save_file(original_controlnet_state(net.state_dict(), dict(net.config)), str(single / "tiny_canny.safetensors"))
    shutil.copy(tmp_path / "net" / "config.json", single / "config.json")
    common[common.index(tmp_path / "net")] = single / "tiny_canny.safetensors"
    (file_png,) = _generate(capsys, model, *common)
    assert len(read_png_parameters(file_png)["controlnets"][0]["sha256"]) == 64
    np.testing.assert_array_equal(_pixels(file_png), expected)
