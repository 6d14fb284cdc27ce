"""What ``diffusekit generate`` records in its PNGs, and ``--from`` redoing an image from that record
(the embedded model; the Stable Diffusion cases are in test_cli_sd.py)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

import diffusekit.embedded
from diffusekit import __version__
from diffusekit.cli import main, read_png_parameters


def generate(capsys, *args) -> list[Path]:
    assert main(["generate", *map(str, args)]) == 0
    return [Path(p) for p in capsys.readouterr().out.split()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def text_chunks(path: Path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def test_bare_generate_makes_one_image_per_class_and_records_everything(tmp_path, capsys):
    written = generate(capsys, "--steps", "2", "--seed", "3", "--out", tmp_path)
    assert [p.name for p in written] == [f"3-{i}.png" for i in range(10)]
    record = read_png_parameters(written[7])
    assert record["model"] == "diffusekit:digits" and record["pipeline"] == "ClassConditionalPipeline"
    assert (record["class_label"], record["class_labels"], record["index"]) == (7, list(range(10)), 7)
    assert (record["seed"], record["image_seed"], record["batch"]) == (3, 10, 10)
    assert (record["steps"], record["guidance"]) == (2, 2.0)  # the pipeline's default guidance, resolved
    assert (record["width"], record["height"], record["dtype"]) == (16, 16, "float32")
    assert record["diffusekit_version"] == __version__
    assert record["scheduler"]["class"] == "DDIMScheduler"
    shipped = json.loads((Path(diffusekit.embedded.__file__).parent / "assets" / "digits" / "scheduler"
                          / "scheduler_config.json").read_text())
    assert {k: record["scheduler"]["config"][k] for k in ("beta_schedule", "prediction_type")} == {
        k: shipped[k] for k in ("beta_schedule", "prediction_type")}
    assert text_chunks(written[7])["parameters"] == (
        "\nSteps: 2, Sampler: DDIM, CFG scale: 2.0, Seed: 10, Size: 16x16, Model: diffusekit:digits, Class: 7, "
        f"Version: diffusekit {__version__}")

    (again,) = generate(capsys, "--from", written[7], "--out", tmp_path / "again")
    assert again.name == "3-7.png"
    assert np.array_equal(pixels(again), pixels(written[7]))
    assert read_png_parameters(again) == record

    (changed,) = generate(capsys, "--from", written[7], "--steps", "3", "--out", tmp_path / "changed")
    assert read_png_parameters(changed)["steps"] == 3
    assert not np.array_equal(pixels(changed), pixels(written[7]))


def test_names_never_overwrite_and_a_missing_seed_is_random_and_recorded(tmp_path, capsys):
    first = generate(capsys, "--class-label", "4", "--steps", "1", "--seed", "8", "--out", tmp_path)
    second = generate(capsys, "--class-label", "4", "--steps", "1", "--seed", "8", "--out", tmp_path)
    assert [p.name for p in first + second] == ["8-0.png", "8-0-1.png"]
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    (random_seed,) = generate(capsys, "--class-label", "4", "--steps", "1", "--seed", "-1", "--out", tmp_path)
    seed = read_png_parameters(random_seed)["seed"]
    assert 0 <= seed < 2**32 and random_seed.name == f"{seed}-0.png"
    (again,) = generate(capsys, "--from", random_seed, "--out", tmp_path / "again")
    assert np.array_equal(pixels(again), pixels(random_seed))


def test_grid_is_recorded_but_not_replayed(tmp_path, capsys):
    written = generate(capsys, "--class-label", "1", "--batch", "3", "--steps", "1", "--seed", "2", "--grid",
                       "--out", tmp_path)
    assert [p.name for p in written] == ["2-0.png", "2-1.png", "2-2.png", "2-grid.png"]
    grid = read_png_parameters(written[-1])
    assert grid["grid"] == {"rows": 2, "cols": 2} and grid["image_seeds"] == [2, 3, 4]
    assert grid["class_labels"] == [1, 1, 1]
    assert main(["generate", "--from", str(written[-1]), "--out", str(tmp_path)]) == 2
    assert "a grid of several images" in capsys.readouterr().err
    (one,) = generate(capsys, "--from", written[1], "--out", tmp_path / "one")
    assert np.array_equal(pixels(one), pixels(written[1]))


def test_from_needs_a_diffusekit_png(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert main(["generate", "--from", str(tmp_path / "plain.png"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --from {tmp_path / 'plain.png'}: no diffusekit generation " \
                                      "parameters stored in it\n"
