"""Control images for ControlNets, made without downloads: Canny edges, depth maps from a depth
estimator the user has, and pose (or any ready-made) images read as given.

:func:`canny` follows OpenCV's ``cv2.Canny(image, 100, 200)`` (the call the diffusers docs use,
on the RGB array): 3x3 Sobel gradients on the 0-255 scale (of each colour channel, keeping the
strongest), L1 magnitude ``|gx| + |gy|`` (``l2_gradient`` for the Euclidean one), non-maximum
suppression along the gradient direction and hysteresis (pixels above ``high_threshold`` start
edges, 8-connected pixels above ``low_threshold`` extend them). OpenCV does not blur;
``blur_sigma`` > 0 smooths with a Gaussian first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .pipelines.image_processing import WIDE_GRAYSCALE_MODES, convert_pil

def load_control_image(image: Image.Image | str | Path) -> Image.Image:
    """A control image as given (a pose skeleton, a ready edge or depth map): an RGB PIL image,
    read from a path when one is given (OSError naming the file when it cannot be read)."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except OSError as error:
            raise OSError(f"cannot read the control image {str(image)!r}: {error}") from error
    if not isinstance(image, Image.Image):
        raise ValueError(f"a control image must be a PIL image or a path, got {type(image).__name__}")
    return convert_pil(image, "RGB")


def _channels(image) -> np.ndarray:
    """``image`` (PIL, or an array (H, W) / (H, W, C) of uint8 or floats in [0, 1]) as float 0-255
    channels (C, H, W): one for grayscale, three for colour (alpha dropped)."""
    if isinstance(image, Image.Image):
        image = np.asarray(convert_pil(image, "L" if image.mode in ("L", "LA", "1", *WIDE_GRAYSCALE_MODES) else "RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = np.moveaxis(image[..., :3], -1, 0)
    elif image.ndim == 2:
        image = image[None]
    else:
        raise ValueError(f"image must be shaped (H, W) or (H, W, 1|3|4), got {image.shape}")
    if min(image.shape) < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    values = image.astype(np.float32)  # exact for 8-bit values and their Sobel sums
    if not np.isfinite(values).all():
        raise ValueError("image holds NaN or infinite values")
    return values if image.dtype == np.uint8 else values * np.float32(255.0)


def _gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (C, H, W) channels (radius 3 sigma, edges replicated)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (1, 2):
        padded = np.pad(values, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        values = sum(w * np.take(padded, np.arange(i, i + values.shape[axis]), axis=axis)
                     for i, w in enumerate(taps))
    return values


def _gradients(values: np.ndarray, l2_gradient: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gx, gy, magnitude)`` (H, W): 3x3 Sobel derivatives of each channel (edge pixels repeated
    outwards), and per pixel those of the channel with the largest magnitude (the first on ties), as
    OpenCV's Canny does for colour images."""
    p = np.pad(values, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    cols = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]
    gx, gy = rows[:, :, 2:] - rows[:, :, :-2], cols[:, 2:] - cols[:, :-2]
    magnitude = np.hypot(gx, gy) if l2_gradient else np.abs(gx) + np.abs(gy)
    if len(values) == 1:
        return gx[0], gy[0], magnitude[0]
    best = np.argmax(magnitude, axis=0)[None]
    return tuple(np.take_along_axis(x, best, axis=0)[0] for x in (gx, gy, magnitude))


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: where ``magnitude`` peaks along the gradient direction (rounded to
    0, 45, 90 or 135 degrees). As OpenCV: along the axes strictly above the previous neighbour and
    at least the next, along the diagonals strictly above both."""
    p = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    angle = np.degrees(np.arctan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45) % 4).astype(np.int8)  # 0: horizontal gradient, 2: vertical
    peak = np.zeros_like(magnitude, dtype=bool)
    for index, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        after = shifted(dy, dx)
        keep = (magnitude > shifted(-dy, -dx)) & ((magnitude > after) if dy and dx else (magnitude >= after))
        peak |= (sector == index) & keep
    return peak


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Pixels of ``weak`` 8-connected (through ``weak``) to a pixel of ``strong`` (a subset of weak)."""
    h, w = weak.shape
    candidate = np.pad(weak, 1).ravel()
    edges = np.zeros_like(candidate)
    width = w + 2
    steps = [dy * width + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    stack = list(np.flatnonzero(np.pad(strong, 1).ravel()))
    edges[stack] = True
    while stack:
        index = stack.pop()
        for step in steps:
            neighbour = index + step
            if candidate[neighbour] and not edges[neighbour]:
                edges[neighbour] = True
                stack.append(neighbour)
    return edges.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny_edges(image, low_threshold: float = 100, high_threshold: float = 200, blur_sigma: float = 0.0,
                l2_gradient: bool = False) -> np.ndarray:
    """Canny edge map of ``image`` as a bool array (H, W); thresholds on the 0-255 Sobel scale.

    ``image``: PIL image or numpy array (H, W) / (H, W, C), uint8 or floats in [0, 1]; colour
    channels each give gradients (the strongest counts). ValueError for thresholds that are negative
    or out of order.
    """
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"low_threshold ({low_threshold}) and high_threshold ({high_threshold}) must satisfy "
                         "0 <= low_threshold <= high_threshold")
    if blur_sigma < 0:
        raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}")
    values = _channels(image)
    if blur_sigma > 0:
        values = _gaussian_blur(values, blur_sigma)
    gx, gy, magnitude = _gradients(values, l2_gradient)
    peak = _thin(magnitude, gx, gy)
    return _hysteresis(peak & (magnitude > high_threshold), peak & (magnitude > low_threshold))


def canny(image, low_threshold: float = 100, high_threshold: float = 200, blur_sigma: float = 0.0,
          l2_gradient: bool = False) -> Image.Image:
    """The Canny control image of ``image``: white edges on black, RGB (the three channels equal),
    the size of ``image``; arguments as :func:`canny_edges`."""
    edges = canny_edges(image, low_threshold, high_threshold, blur_sigma, l2_gradient)
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1))


def depth_map(image: Image.Image, depth_estimator, feature_extractor) -> Image.Image:
    """A grayscale depth control image (RGB, near = white) of ``image``'s size.

    Needs a depth model the user has: ``depth_estimator`` (e.g. transformers'
    ``DPTForDepthEstimation``, called on pixel values, returning ``predicted_depth``) and its
    ``feature_extractor`` (``DPTImageProcessor``); nothing is downloaded here. The depth is resized
    bicubically to the image and scaled to 0-255 (its minimum to 0, its maximum to 255, truncated
    as the diffusers docs' ``get_depth_map`` does).
    """
    import torch

    image = load_control_image(image)
    pixels = feature_extractor(images=[image], return_tensors="pt").pixel_values
    parameter = next(depth_estimator.parameters(), None)
    if parameter is not None:
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        depth = depth_estimator(pixels).predicted_depth
    if depth.ndim != 3:
        raise ValueError(f"depth_estimator's predicted_depth must be (batch, height, width), got {tuple(depth.shape)}")
    depth = torch.nn.functional.interpolate(depth[:1, None].float(), size=(image.height, image.width),
                                            mode="bicubic", align_corners=False)[0, 0]
    low, high = depth.min(), depth.max()
    scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
    gray = (scaled * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))


#: Preprocessors that need nothing but the image, by the name the CLI takes.
PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {"canny": canny, "none": load_control_image}


def preprocess(name: str, image, **options) -> Image.Image:
    """Apply the preprocessor ``name`` (:data:`PREPROCESSORS`) to ``image``; ValueError for unknown names."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown control preprocessor {name!r}; choose one of {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[name](load_control_image(image), **options)
