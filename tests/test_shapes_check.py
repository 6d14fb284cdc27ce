"""benchmarks/shapes_check.py: the analytic checker reads the data set's own images right and flags wrong captions."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusekit.training.shapes import ShapeObject, ShapeScene, make_shapes, render

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import shapes_check  # noqa: E402


@pytest.fixture(scope="module")
def dataset():
    return make_shapes(100, seed=123)


def test_data_set_images_score_at_least_99_percent(dataset):
    images, scenes = dataset
    scores = shapes_check.score(zip(images, scenes))
    assert scores["all"]["count"] == 100 and scores["held_out"]["count"] == 0
    assert shapes_check.lowest_rate(scores) >= 0.99


def test_held_out_images_score_at_least_99_percent():
    images, scenes = make_shapes(40, seed=7, split="held_out")
    scores = shapes_check.score(zip(images, (scene.caption for scene in scenes)))
    assert scores["seen"]["count"] == 0 and scores["held_out"]["count"] == 40
    assert shapes_check.lowest_rate(scores) >= 0.99


def test_noise_and_blur_still_read_right(dataset):
    images, scenes = dataset
    scores = shapes_check.score(zip(shapes_check.degrade(images[:50], noise=12, blur=1.0), scenes[:50]))
    assert shapes_check.lowest_rate(scores) >= 0.97


def _image(*objects: ShapeObject, background: str = "white", seed: int = 0):
    scene = ShapeScene(objects, background)
    return render(scene, np.random.default_rng(seed)), scene


def test_wrong_colour_shape_position_and_background_are_flagged():
    image, _ = _image(ShapeObject("red", "triangle", "at the top left"))
    assert shapes_check.check_image(image, "a red triangle at the top left on a white background").all_right
    cases = {
        "a orange triangle at the top left on a white background": (False, True, True),
        "a red circle at the top left on a white background": (True, False, True),
        "a red square at the top left on a white background": (True, False, True),
        "a red triangle at the top on a white background": (True, True, False),
    }
    for caption, (colour, shape, position) in cases.items():
        check = shapes_check.check_image(image, caption).objects[0]
        assert (check.colour, check.shape, check.position) == (colour, shape, position), caption
        assert not check.all_right
    assert not shapes_check.check_image(image, "a red triangle at the top left on a black background").background


def test_two_objects_match_by_colour_then_position():
    image, scene = _image(ShapeObject("blue", "square", "on the left"), ShapeObject("blue", "circle", "on the right"),
                          background="gray")
    check = shapes_check.check_image(image, scene)
    assert check.all_right and check.found_count == 2
    swapped = shapes_check.check_image(image, "a blue square on the right and a blue circle on the left on a gray "
                                              "background")
    # matched by place (both blue), so each has the other's shape
    assert [(c.colour, c.shape, c.position) for c in swapped.objects] == [(True, False, True)] * 2
    wrong = shapes_check.check_image(image, "a yellow square on the left and a blue circle on the right on a gray "
                                            "background")
    assert [c.all_right for c in wrong.objects] == [False, True]


def test_missing_object_is_all_wrong():
    image, _ = _image(ShapeObject("green", "circle", "in the center"), background="black")
    check = shapes_check.check_image(image, "a green circle in the center and a red square at the top on a black "
                                            "background")
    assert check.objects[0].all_right
    assert check.objects[1].found is None and not any((check.objects[1].colour, check.objects[1].shape))
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert shapes_check.check_image(blank, "a red square at the top on a black background").objects[0].found is None


def test_other_sizes_are_read_in_proportion():
    scene = ShapeScene((ShapeObject("purple", "circle", "at the bottom right"),), "white")
    image = render(scene, np.random.default_rng(1), resolution=128)
    assert shapes_check.check_image(image, scene).all_right


def test_bad_image_names_its_shape():
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\), got \(64, 64\)"):
        shapes_check.check_image(np.zeros((64, 64), dtype=np.uint8), "a red square at the top on a black background")


def test_draw_scenes_is_deterministic_with_a_held_out_share():
    scenes = shapes_check.draw_scenes(40, seed=3)
    assert [s.caption for s in scenes] == [s.caption for s in shapes_check.draw_scenes(40, seed=3)]
    assert sum(len(s.objects) == 1 for s in scenes) == 20
    assert sum(s.held_out() for s in scenes) == 10
    with pytest.raises(ValueError, match="count"):
        shapes_check.draw_scenes(1, seed=0)


def test_validate_command_writes_scores(tmp_path, capsys):
    out, grid = tmp_path / "results.json", tmp_path / "grid.png"
    assert shapes_check.main(["--validate", "--count", "12", "--out", str(out), "--grid", str(grid)]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == 12 and len(result["items"]) == 12
    assert result["scores"]["all"]["one_object"]["all"] == 1.0
    assert "| all | 12" in capsys.readouterr().out
    assert grid.stat().st_size > 0


def test_generation_batches_prompts_as_generate_makes_them_one_by_one(tmp_path, capsys):
    from PIL import Image
    from sd_components import save_tiny_sd_folder

    from diffusekit.cli import main as cli_main

    folder = save_tiny_sd_folder(tmp_path / "sd", tmp_path / "tokenizer")
    captions = [scene.caption for scene in shapes_check.draw_scenes(3, seed=0)]
    images, used = shapes_check.generate(str(folder), captions, seed=5, batch=2, device="cpu", extra=["--steps", "2"])
    assert used["steps"] == 2 and used["guidance"] == 7.5  # the pipeline's default, as `generate` leaves it
    assert [image.shape for image in images] == [(64, 64, 3)] * 3
    for i, caption in enumerate(captions):
        assert cli_main(["generate", str(folder), "--prompt", caption, "--seed", str(5 + i), "--steps", "2",
                         "--height", "64", "--width", "64", "--out", str(tmp_path / "out")]) == 0
        alone = np.asarray(Image.open(capsys.readouterr().out.split()[0]).convert("RGB"))
        assert np.abs(alone.astype(int) - images[i]).max() <= 1, caption  # batching changes no image
