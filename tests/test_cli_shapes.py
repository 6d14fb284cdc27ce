"""The embedded text-to-image model from the command line: ``diffusekit generate "PROMPT"`` offline."""

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli import main
from diffusekit.cli_metadata import read_png_parameters
from diffusekit.embedded import embedded_model_path
from diffusekit.schedulers.names import SAMPLER_NAMES

PROMPT = "a red square at the top left on a white background"


def generate(capsys, *options: str) -> list[str]:
    code = main(["generate", *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.split()


def test_a_prompt_alone_uses_the_embedded_text_to_image_model(tmp_path, capsys):
    (png,) = generate(capsys, PROMPT, "--steps", "8", "--seed", "2", "--out", str(tmp_path))
    record = read_png_parameters(png)
    assert record["model"] == "diffusekit:shapes" and record["prompt"] == PROMPT
    assert record["pipeline"] == "StableDiffusionPipeline"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (64, 64, 3) and image.std() > 10  # a drawing, not a flat colour
    (again,) = generate(capsys, "--from", png, "--out", str(tmp_path / "again"))
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), image)


def test_prompt_option_and_named_embedded_models(tmp_path, capsys):
    (png,) = generate(capsys, "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path))
    assert read_png_parameters(png)["model"] == "diffusekit:shapes"
    pngs = generate(capsys, "diffusekit:digits", "--class-label", "4", "--steps", "2", "--out", str(tmp_path / "d"))
    assert read_png_parameters(pngs[0])["model"] == "diffusekit:digits"
    assert main(["generate", "diffusekit:cats", "--prompt", "a cat", "--out", str(tmp_path)]) == 2
    assert "no such embedded model; there are diffusekit:digits, diffusekit:shapes" in capsys.readouterr().err


def test_image_to_image_inpainting_weighting_and_the_style_lora(tmp_path, capsys):
    (source,) = generate(capsys, PROMPT, "--steps", "6", "--seed", "0", "--out", str(tmp_path / "a"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    mask.save(tmp_path / "mask.png")
    (img2img,) = generate(capsys, "a blue square at the top left on a white background", "--image", source,
                          "--strength", "0.6", "--steps", "6", "--out", str(tmp_path / "b"))
    (inpainted,) = generate(capsys, PROMPT, "--image", source, "--mask", str(tmp_path / "mask.png"),
                            "--steps", "6", "--out", str(tmp_path / "c"))
    assert read_png_parameters(img2img)["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert read_png_parameters(inpainted)["pipeline"] == "StableDiffusionInpaintPipeline"
    (weighted,) = generate(capsys, "a (red:1.4) square at the top left on a white background", "--prompt-weighting",
                           "a1111", "--steps", "6", "--seed", "0", "--out", str(tmp_path / "d"))
    assert read_png_parameters(weighted)["prompt_weighting"] == "a1111"
    lora = embedded_model_path("shapes") / "lora" / "outlined.safetensors"
    (styled,) = generate(capsys, PROMPT, "--lora", f"{lora}:1.0", "--steps", "6", "--seed", "0",
                         "--out", str(tmp_path / "e"))
    plain, outlined = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (source, styled))
    assert np.abs(plain - outlined).max() > 30


@pytest.mark.parametrize("name", sorted(SAMPLER_NAMES))
def test_every_scheduler_name_samples_the_shapes_model(name, tmp_path, capsys):
    (png,) = generate(capsys, PROMPT, "--scheduler", name, "--steps", "4", "--seed", "1", "--out", str(tmp_path))
    assert read_png_parameters(png)["scheduler"]["name"] == name
    assert np.isfinite(np.asarray(Image.open(png), dtype=float)).all()
    assert Image.open(png).convert("L").getextrema() != (0, 0)


def test_model_defaults_file_fills_unset_options_and_names_bad_keys(tmp_path, capsys):
    (png,) = generate(capsys, PROMPT, "--steps", "2", "--out", str(tmp_path))
    assert read_png_parameters(png)["guidance"] == 5.0  # assets/shapes/diffusekit_defaults.json
    (png,) = generate(capsys, PROMPT, "--steps", "2", "--guidance", "4", "--out", str(tmp_path))
    assert read_png_parameters(png)["guidance"] == 4.0
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "diffusekit_defaults.json").write_text('{"cfg": 3}')
    assert main(["generate", str(folder), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "diffusekit_defaults.json: unknown keys ['cfg']" in capsys.readouterr().err


def test_demo_prompts_follow_the_grammar():
    from diffusekit.embedded import SHAPES_DEMO_PROMPTS
    from diffusekit.training.shapes import parse_caption

    assert len(SHAPES_DEMO_PROMPTS) == 8
    assert [len(parse_caption(p).objects) for p in SHAPES_DEMO_PROMPTS] == [1] * 6 + [2] * 2
