"""The synthetic shapes data set: deterministic, captions in the grammar, held-out combinations kept apart."""

import re

import numpy as np
import pytest

from diffusekit.training.shapes import (
    BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, SHAPES, ShapeObject, ShapeScene, cell_centre, make_shapes,
    parse_caption, random_scene, render, shape_mask,
)

_OBJECT = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)})"
GRAMMAR = re.compile(rf"{_OBJECT}( and {_OBJECT})? on a ({'|'.join(BACKGROUNDS)}) background")


def test_same_seed_same_images_and_captions():
    images_a, scenes_a = make_shapes(12, seed=5)
    images_b, scenes_b = make_shapes(12, seed=5)
    assert images_a.shape == (12, 64, 64, 3) and images_a.dtype == np.uint8
    np.testing.assert_array_equal(images_a, images_b)
    assert [s.caption for s in scenes_a] == [s.caption for s in scenes_b]


def test_different_seed_differs():
    images_a, scenes_a = make_shapes(12, seed=5)
    images_b, scenes_b = make_shapes(12, seed=6)
    assert not np.array_equal(images_a, images_b)
    assert [s.caption for s in scenes_a] != [s.caption for s in scenes_b]


def test_captions_follow_the_grammar_and_parse_back():
    _, scenes = make_shapes(60, seed=1)
    assert {len(s.objects) for s in scenes} == {1, 2}
    for scene in scenes:
        assert GRAMMAR.fullmatch(scene.caption), scene.caption
        assert parse_caption(scene.caption) == scene
        assert len({obj.position for obj in scene.objects}) == len(scene.objects)  # distinct cells


def test_two_object_fraction_and_resolution():
    images, scenes = make_shapes(8, seed=2, two_object_fraction=0.0, resolution=32)
    assert images.shape == (8, 32, 32, 3)
    assert all(len(s.objects) == 1 for s in scenes)
    assert all(len(s.objects) == 2 for s in make_shapes(8, seed=2, two_object_fraction=1.0)[1])


def test_held_out_scenes_are_never_trained_on_and_always_in_the_held_out_split():
    _, train = make_shapes(150, seed=3)
    _, held = make_shapes(50, seed=3, split="held_out")
    assert not any(scene.held_out() for scene in train)
    assert all(scene.held_out() for scene in held)
    assert not any(obj.colour == "green" and obj.shape == "triangle" for s in train for obj in s.objects)
    assert ShapeObject("purple", "square", "at the bottom right").held_out()
    assert not ShapeObject("purple", "square", "at the bottom").held_out()
    assert len(HELD_OUT) == 2


def test_render_draws_the_colour_at_the_cell_centre_on_the_background():
    scene = ShapeScene((ShapeObject("blue", "square", "at the bottom left"),), "gray")
    image = render(scene, np.random.default_rng(0))
    x, y = (round(v) for v in cell_centre("at the bottom left"))
    assert tuple(image[y, x]) == COLOURS["blue"]
    assert tuple(image[2, 62]) == BACKGROUNDS["gray"]


def test_triangle_points_up():
    mask = shape_mask("triangle", (32.0, 32.0), 16.0)
    assert mask[25:28].sum() < mask[37:40].sum()  # narrow near the apex, wide near the base
    assert mask.sum() == pytest.approx(128, rel=0.05)  # half the 16 x 16 box


@pytest.mark.parametrize("call, argument", [
    (lambda: make_shapes(0), "count"),
    (lambda: make_shapes(4, two_object_fraction=1.5), "two_object_fraction"),
    (lambda: make_shapes(4, split="test"), "split"),
    (lambda: random_scene(np.random.default_rng(0), 3), "num_objects"),
    (lambda: cell_centre("at the side"), "position"),
    (lambda: shape_mask("star", (8.0, 8.0), 4.0), "shape"),
])
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize("caption, part", [
    ("a red circle at the top", "background"),
    ("a red circle at the top on a pink background", "background"),
    ("a pink circle at the top on a white background", "'a pink circle at the top'"),
    ("a red circle somewhere on a white background", "'a red circle somewhere'"),
    ("a red circle at the top and a blue square on the left and a green circle in the center on a black background",
     "at most two objects"),
])
def test_bad_captions_name_the_part(caption, part):
    with pytest.raises(ValueError, match=re.escape(part)):
        parse_caption(caption)


def test_parse_caption_ignores_case_and_outer_spaces():
    scene = parse_caption("  A Red Circle At The Top on a White background ")
    assert scene == ShapeScene((ShapeObject("red", "circle", "at the top"),), "white")
