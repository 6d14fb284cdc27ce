"""``diffusekit generate --ip-adapter ADAPTER --ip-image REF.png [--ip-scale S] [--ip-image-encoder DIR]``
on a tiny Stable Diffusion folder: the Python API's image, the record in the PNG, ``--from``, errors."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusekit import StableDiffusionPipeline
from diffusekit.cli import main
from diffusekit.cli_metadata import read_png_parameters
from ip_adapter_files import save_ip_adapter
from sd_components import save_tiny_sd_folder

PROMPT = "the cat"
STEPS, SIZE, SEED = 2, 32, 3


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def adapter(sd_folder, tmp_path_factory):
    """An adapter folder (weights file + image_encoder/) and a reference image."""
    unet = StableDiffusionPipeline.from_pretrained(sd_folder).unet
    folder = tmp_path_factory.mktemp("adapter")
    save_ip_adapter(folder, unet, "plus")
    reference = folder.parent / "ref.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype("uint8")).save(reference)
    return folder, reference


def _cli(sd_folder, out, capsys, *options):
    args = ["generate", str(sd_folder), "--prompt", PROMPT, "--steps", str(STEPS), "--height", str(SIZE),
            "--width", str(SIZE), "--seed", str(SEED), "--out", str(out), *map(str, options)]
    assert main(args) == 0
    (path,) = capsys.readouterr().out.split()
    return path, np.asarray(Image.open(path))


def _api(sd_folder, adapter_folder, reference, scale):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(adapter_folder)
    pipe.set_ip_adapter_scale(scale)
    image = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                 ip_adapter_image=Image.open(reference).convert("RGB"),
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


def test_generate_with_an_image_prompt_matches_the_api_and_is_recorded(sd_folder, adapter, tmp_path, capsys):
    folder, reference = adapter
    path, image = _cli(sd_folder, tmp_path / "a", capsys, "--ip-adapter", folder, "--ip-image", reference,
                       "--ip-scale", "0.6")
    np.testing.assert_array_equal(image, _api(sd_folder, folder, reference, 0.6))
    _, plain = _cli(sd_folder, tmp_path / "b", capsys)
    assert np.abs(plain.astype(int) - image.astype(int)).max() > 2
    record = read_png_parameters(path)["ip_adapter"]
    weights = folder / "ip-adapter.safetensors"
    assert record["path"] == str(weights.resolve()) and record["scale"] == 0.6
    assert record["image"]["path"] == str(reference.resolve()) and len(record["image"]["sha256"]) == 64
    assert record["image_encoder"] is None
    assert "IP-Adapter: ip-adapter (0.6)" in Image.open(path).text["parameters"]

    again, replayed = _cli(sd_folder, tmp_path / "c", capsys, "--from", path)  # --from replays the image prompt
    np.testing.assert_array_equal(replayed, image)
    assert read_png_parameters(again)["ip_adapter"] == record


def test_a_lone_file_with_an_image_encoder_folder(sd_folder, adapter, tmp_path, capsys):
    folder, reference = adapter
    lone = tmp_path / "lone" / "my_adapter.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((folder / "ip-adapter.safetensors").read_bytes())
    path, image = _cli(sd_folder, tmp_path / "out", capsys, "--ip-adapter", lone, "--ip-image", reference,
                       "--ip-image-encoder", folder / "image_encoder")
    np.testing.assert_array_equal(image, _api(sd_folder, folder, reference, 1.0))
    assert read_png_parameters(path)["ip_adapter"]["image_encoder"] == str((folder / "image_encoder").resolve())


def test_errors_name_the_option(sd_folder, adapter, tmp_path, capsys):
    folder, reference = adapter
    common = ["generate", str(sd_folder), "--prompt", PROMPT, "--steps", "1", "--out", str(tmp_path / "out")]

    def error(*options) -> str:
        assert main([*common, *map(str, options)]) == 2
        return capsys.readouterr().err

    assert "--ip-adapter and --ip-image go together" in error("--ip-image", reference)
    assert "--ip-scale needs --ip-adapter" in error("--ip-scale", "0.5")
    assert "--ip-scale must be a finite number" in error("--ip-adapter", folder, "--ip-image", reference,
                                                          "--ip-scale", "nan")
    missing = tmp_path / "missing"
    assert error("--ip-adapter", missing, "--ip-image", reference) == (
        f"error: --ip-adapter {missing}: no such file or folder\n")
    assert re.match(r"error: --ip-image .*adapter.*: not a readable image",
                    error("--ip-adapter", folder, "--ip-image", folder / "ip-adapter.safetensors"))
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((folder / "ip-adapter.safetensors").read_bytes())
    assert re.match(r"error: --ip-adapter .*lone\.safetensors: .*no image encoder folder 'image_encoder' beside",
                    error("--ip-adapter", lone, "--ip-image", reference))
    state = load_file(folder / "ip-adapter.safetensors")
    save_file({**state, "ip_adapter.99.to_k_ip.weight": torch.zeros(8, 32)}, str(folder.parent / "bad.safetensors"))
    assert re.search(r"^error: --ip-adapter .*bad\.safetensors: .*ip_adapter\.99\.to_k_ip\.weight matches no",
                    error("--ip-adapter", folder.parent / "bad.safetensors", "--ip-image", reference,
                          "--ip-image-encoder", folder / "image_encoder"), re.M)
    assert not (tmp_path / "out").exists()  # nothing generated


def test_image_prompt_with_a_controlnet(sd_folder, adapter, tmp_path, capsys):
    """``--ip-adapter`` and ``--controlnet`` together: the ControlNet pipeline takes the image prompt."""
    from diffusekit import ControlNetModel, StableDiffusionControlNetPipeline

    folder, reference = adapter
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet=ControlNetModel.from_unet(
        StableDiffusionPipeline.from_pretrained(sd_folder).unet, conditioning_embedding_out_channels=(8, 16)))
    pipe.controlnet.save_pretrained(tmp_path / "net")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(folder)
    pipe.set_ip_adapter_scale(0.6)
    control = Image.open(reference).convert("RGB").resize((SIZE, SIZE))
    expected = pipe(PROMPT, image=control, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                    ip_adapter_image=Image.open(reference).convert("RGB"),
                    generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    control.save(tmp_path / "control.png")
    path, image = _cli(sd_folder, tmp_path / "out", capsys, "--ip-adapter", folder, "--ip-image", reference,
                       "--ip-scale", "0.6", "--controlnet", tmp_path / "net", "--control-image",
                       tmp_path / "control.png")
    np.testing.assert_array_equal(image, np.asarray(expected))
    record = read_png_parameters(path)
    assert record["ip_adapter"]["scale"] == 0.6 and len(record["controlnets"]) == 1
