"""Control-image preprocessors: Canny edges (where, how thick, thresholds, hysteresis, blur),
depth maps from a given estimator, images read as given, errors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.control_preprocess import (
    canny, canny_edges, depth_map, load_control_image, preprocess,
)


def _square(value=255, size=32, start=8, stop=24) -> np.ndarray:
    image = np.zeros((size, size), dtype=np.uint8)
    image[start:stop, start:stop] = value
    return image


def test_square_edges_lie_on_its_border():
    edges = canny_edges(_square())
    rows, cols = np.nonzero(edges)
    # a step between pixels 7 and 8 (and 23 and 24): the one-pixel line sits on one side of it
    assert set(rows) <= set(range(7, 24)) and set(cols) <= set(range(7, 24))
    assert edges[7, 12] and edges[23, 12] and edges[12, 7] and edges[12, 23]
    assert not edges[9:23, 9:23].any(), "nothing inside the square"
    assert edges[:, 12].sum() == 2 and edges[12, :].sum() == 2, "lines one pixel thick"


def test_canny_image_is_rgb_white_on_black_and_deterministic():
    image = Image.fromarray(np.stack([_square()] * 3, axis=-1))
    first, second = canny(image), canny(image)
    pixels = np.asarray(first)
    assert first.mode == "RGB" and first.size == (32, 32)
    assert set(np.unique(pixels)) == {0, 255}
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert np.array_equal(pixels, np.asarray(second))
    assert np.array_equal(pixels[..., 0] == 255, canny_edges(_square()))


@pytest.mark.parametrize("channels, l2_gradient, count, index_sum", [
    (None, False, 1152, 1776282), (None, True, 1151, 1766632), (3, False, 1111, 1704044), (3, True, 1140, 1761043),
], ids=["gray", "gray-l2", "rgb", "rgb-l2"])
def test_edges_equal_opencv(channels, l2_gradient, count, index_sum):
    """Noise images whose ``cv2.Canny(image, 100, 200, L2gradient=...)`` edges (OpenCV 5.0, on the
    uint8 array as given: colour channels too) have this many pixels at these flat indices."""
    shape = (48, 64) if channels is None else (48, 64, channels)
    image = np.random.default_rng(2 if channels is None else 3).integers(0, 256, shape, dtype=np.uint8)
    edges = canny_edges(image, 100, 200, l2_gradient=l2_gradient)
    assert (edges.sum(), np.flatnonzero(edges).sum()) == (count, index_sum)


def test_a_gray_pil_image_gives_the_edges_of_its_array():
    image = _square(180)
    assert np.array_equal(canny_edges(Image.fromarray(image)), canny_edges(image))
    assert np.array_equal(canny_edges(Image.fromarray(np.stack([image] * 3, axis=-1))), canny_edges(image))


def test_float_arrays_read_as_zero_to_one():
    assert np.array_equal(canny_edges(_square().astype(np.float32) / 255), canny_edges(_square()))


def test_thresholds_on_the_sobel_scale():
    # a straight step of 50 gives |gx| + |gy| = 4 * 50 = 200: not above high_threshold=200
    step = np.zeros((16, 16), dtype=np.uint8)
    step[:, 8:] = 50
    assert not canny_edges(step, 100, 200).any()
    assert canny_edges(step, 100, 199.5)[:, 7].all()
    assert not canny_edges(step * 5, 100, 1001).any(), "a step of 250 gives 1000"
    assert canny_edges(step * 5, 100, 999).sum() == 16


def test_hysteresis_keeps_weak_edges_only_when_joined_to_strong_ones():
    image = np.zeros((32, 64), dtype=np.uint8)
    image[8:24, 8:24] = 30  # a weak square alone: magnitude 120, between the thresholds
    image[8:16, 36:52] = 255  # a strong half on top of a weak half
    image[16:24, 36:52] = 30
    edges = canny_edges(image, 100, 200)
    assert not edges[:, :30].any()
    assert edges[20, 35] and edges[20, 51], "weak sides joined to the strong ones stay"
    assert not canny_edges(image, 125, 200)[20, 35], "below the low threshold they go"


def test_blur_removes_a_single_bright_pixel():
    dot = np.zeros((24, 24), dtype=np.uint8)
    dot[12, 12] = 255
    assert canny_edges(dot).any()
    assert not canny_edges(dot, blur_sigma=2.0).any()
    assert canny_edges(_square(), blur_sigma=1.0)[12, 7], "a real edge survives the blur"


@pytest.mark.parametrize("kwargs, message", [
    (dict(low_threshold=200, high_threshold=100), "low_threshold \\(200\\) and high_threshold \\(100\\)"),
    (dict(low_threshold=-1), "0 <= low_threshold"),
    (dict(blur_sigma=-0.5), "blur_sigma must be >= 0"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        canny_edges(_square(), **kwargs)


@pytest.mark.parametrize("image, message", [
    (np.zeros((2, 8, 8, 3)), "shaped \\(H, W\\) or \\(H, W, 1\\|3\\|4\\)"),
    (np.zeros((8, 8, 5)), "shaped"),
    (np.zeros((0, 8)), "must not be empty"),
    (np.full((8, 8), np.nan), "NaN"),
    ([[0, 1], [1, 0]], "PIL image or a numpy array, got list"),
])
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        canny_edges(image)


def test_load_control_image_reads_as_given(tmp_path):
    pose = np.zeros((16, 24, 4), dtype=np.uint8)
    pose[4:8, 2:20] = (255, 0, 0, 255)
    path = tmp_path / "pose.png"
    Image.fromarray(pose, mode="RGBA").save(path)
    image = load_control_image(path)
    assert image.mode == "RGB" and image.size == (24, 16)
    assert np.array_equal(np.asarray(image), pose[..., :3])
    assert np.array_equal(np.asarray(preprocess("none", str(path))), pose[..., :3])
    with pytest.raises(OSError, match="cannot read the control image .*missing.png"):
        load_control_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="PIL image or a path, got int"):
        load_control_image(3)


def test_preprocess_by_name(tmp_path):
    path = tmp_path / "square.png"
    Image.fromarray(_square()).save(path)
    assert np.array_equal(np.asarray(preprocess("canny", path))[..., 0] == 255, canny_edges(_square()))
    with pytest.raises(ValueError, match="unknown control preprocessor 'sobel'; choose one of \\['canny', 'none'\\]"):
        preprocess("sobel", path)


class _RampDepth(torch.nn.Module):
    """A stand-in depth estimator: depth grows to the right, at half the input's resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, pixels):
        width = pixels.shape[-1] // 2
        ramp = torch.arange(width, dtype=pixels.dtype).expand(pixels.shape[0], pixels.shape[-2] // 2, width)
        return SimpleNamespace(predicted_depth=ramp * self.scale)


def _extractor(images, return_tensors):
    assert return_tensors == "pt"
    arrays = [np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255 for image in images]
    return SimpleNamespace(pixel_values=torch.from_numpy(np.stack(arrays)))


def test_depth_map_from_a_given_estimator():
    image = Image.new("RGB", (24, 16), (10, 20, 30))
    depth = depth_map(image, _RampDepth(), _extractor)
    pixels = np.asarray(depth)
    assert depth.mode == "RGB" and depth.size == (24, 16)
    assert pixels.min() == 0 and pixels.max() == 255
    assert (np.diff(pixels[8, :, 0].astype(int)) >= 0).all(), "scaled, not reordered"
    assert (pixels[..., 0] == pixels[..., 1]).all()


def test_depth_map_checks_the_estimator_output():
    flat = lambda pixels: SimpleNamespace(predicted_depth=torch.zeros(1, 1, 8, 8))  # noqa: E731
    flat.parameters = lambda: iter(())
    with pytest.raises(ValueError, match="predicted_depth must be \\(batch, height, width\\), got \\(1, 1, 8, 8\\)"):
        depth_map(Image.new("RGB", (8, 8)), flat, _extractor)


def test_depth_map_with_a_tiny_dpt_follows_the_docs_recipe():
    """transformers' DPT (tiny, random): the docs' get_depth_map (bicubic to the image size, min-max
    scaled, times 255 truncated, three equal channels)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=32, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                       backbone_out_indices=[0, 1, 2, 3])
    torch.manual_seed(0)
    estimator = DPTForDepthEstimation(config).eval()
    extractor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        depth = estimator(extractor(images=image, return_tensors="pt").pixel_values).predicted_depth
    depth = torch.nn.functional.interpolate(depth.unsqueeze(1), size=(24, 40), mode="bicubic", align_corners=False)
    depth = (depth - depth.amin()) / (depth.amax() - depth.amin())
    expected = (depth[0, 0].numpy() * 255.0).clip(0, 255).astype(np.uint8)
    pixels = np.asarray(depth_map(image, estimator, extractor))
    assert pixels.shape == (24, 40, 3)
    assert np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=-1))
