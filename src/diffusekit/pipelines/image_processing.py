"""Image pre- and post-processing shared by the pipelines."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Convert images in [0, 1], shaped (N, H, W, C) or (H, W, C), to PIL images."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def postprocess_images(images: torch.Tensor, output_type: str = "pil", from_minus_one: bool = True,
                       do_denormalize: Sequence[bool] | None = None):
    """Turn a model-space batch (N, C, H, W) into the requested ``output_type``: pil, np or pt.

    ``do_denormalize`` (one flag per image, as the reference's VAE image processor takes it) maps
    only the flagged images from [-1, 1] to [0, 1] and leaves the others untouched (e.g. the black
    images of the safety checker).
    """
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    if do_denormalize is not None:
        if len(do_denormalize) != images.shape[0]:
            raise ValueError(f"do_denormalize has {len(do_denormalize)} flags for {images.shape[0]} images")
        images = torch.stack([(im / 2 + 0.5).clamp(0, 1) if flag else im for im, flag in zip(images, do_denormalize)])
    else:
        if from_minus_one:
            images = images / 2 + 0.5
        images = images.clamp(0, 1)
    if output_type == "pt":
        return images
    array = tensor_to_numpy(images)
    return numpy_to_pil(array) if output_type == "pil" else array


# -- PIL modes ----------------------------------------------------------------------------------

#: Integer grayscale modes with more than 8 bits (16-bit PNGs open as one of these).
WIDE_GRAYSCALE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (:data:`WIDE_GRAYSCALE_MODES`) scaled to 8-bit "L" (PIL's own conversion
    clips it at 255 instead); other images unchanged."""
    if image.mode not in WIDE_GRAYSCALE_MODES:
        return image
    values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def convert_pil(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` ("RGB" for images, "L" for masks), as the reference converts them: alpha
    dropped, palettes expanded; 16-bit grayscale scaled (see :func:`eight_bit`)."""
    image = eight_bit(image)
    return image if image.mode == mode else image.convert(mode)


def _pixel_channels(batch: torch.Tensor, name: str, latent_channels: int | None) -> torch.Tensor:
    """An (N, C, H, W) pixel batch with 3 channels: grayscale repeated, anything but RGB refused."""
    channels = batch.shape[1]
    if channels == 1:
        return batch.repeat(1, 3, 1, 1)
    if channels != 3:
        latents = f", or {latent_channels} for latents (tensors only)" if latent_channels else ""
        raise ValueError(f"{name} has {channels} channels; pixels must have 3 (RGB) or 1 (grayscale){latents}. "
                         "Drop the alpha channel of RGBA images first")
    return batch


def _array_values(array: np.ndarray) -> np.ndarray:
    """Float values in [0, 1] for integer arrays (scaled by their type's maximum, e.g. 65535 for uint16)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / np.iinfo(array.dtype).max
    return array


# -- inpainting masks ---------------------------------------------------------------------------

def _resize_keep_ratio(image: Image.Image, width: int, height: int, fill: bool) -> Image.Image:
    """Resize keeping the aspect ratio, centred on a ``width`` x ``height`` RGB canvas. ``fill``:
    fit inside and stretch the edge rows/columns into the margins; otherwise cover and crop."""
    ratio, src_ratio = width / height, image.width / image.height
    fit_width = ratio < src_ratio if fill else ratio > src_ratio
    src_w = width if fit_width else image.width * height // image.height
    src_h = height if not fit_width else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if not fill:
        return canvas
    if ratio < src_ratio:
        margin = height // 2 - src_h // 2
        if margin > 0:
            canvas.paste(resized.resize((width, margin), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, margin), box=(0, resized.height, width, resized.height)),
                         box=(0, margin + src_h))
    elif ratio > src_ratio:
        margin = width // 2 - src_w // 2
        if margin > 0:
            canvas.paste(resized.resize((margin, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((margin, height), box=(resized.width, 0, resized.width, height)),
                         box=(margin + src_w, 0))
    return canvas


def resize_pil(image: Image.Image, width: int, height: int, resize_mode: str = "default") -> Image.Image:
    """Resize with Lanczos: ``default`` stretches, ``fill`` fits and pads with stretched edges,
    ``crop`` covers and crops (both keep the aspect ratio)."""
    if resize_mode == "default":
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    if resize_mode in ("fill", "crop"):
        return _resize_keep_ratio(image, width, height, fill=resize_mode == "fill")
    raise ValueError(f"resize_mode must be 'default', 'fill' or 'crop', got {resize_mode!r}")


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an array (..., H, W, C) / (H, W) or a tensor (..., C, H, W) /
    (H, W), or of the first item of a list of them."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        return tuple(first.shape[:2]) if first.ndim == 2 else tuple(first.shape[-3:-1])
    if isinstance(first, torch.Tensor):
        return tuple(first.shape[-2:])
    raise ValueError(f"expected a PIL image, numpy array or tensor, got {type(first).__name__}")


def _mask_batch(mask) -> torch.Tensor | list[Image.Image]:
    """PIL masks as a list; arrays and tensors as one float tensor (N, 1, H, W)."""
    items = mask if isinstance(mask, (list, tuple)) else [mask]
    if not items:
        raise ValueError("mask_image is an empty list")
    if all(isinstance(m, Image.Image) for m in items):
        return list(items)
    if all(isinstance(m, np.ndarray) for m in items):
        # (H, W) and (H, W, 1) are one mask, (N, H, W) a batch of them
        arrays = [m[None] if m.ndim == 2 or (m.ndim == 3 and m.shape[-1] == 1) else m for m in items]
        arrays = [_array_values(a[..., None] if a.ndim == 3 else a) for a in arrays]
        if any(a.ndim != 4 or a.shape[-1] != 1 for a in arrays):
            raise ValueError("mask_image arrays must be (H, W), (H, W, 1), (N, H, W) or (N, H, W, 1)")
        return numpy_to_tensor(np.concatenate(arrays)).float()
    if all(isinstance(m, torch.Tensor) for m in items):
        tensors = [m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m for m in items]
        if any(t.ndim != 4 for t in tensors):
            raise ValueError("mask_image tensors must be (H, W), (N, H, W) or (N, 1, H, W)")
        return torch.cat(tensors)
    raise ValueError("mask_image must be a PIL image, a numpy array or a tensor, or a list of one kind of them")


def mask_size(mask) -> tuple[int, int]:
    """(height, width) of a mask in any of the forms :func:`preprocess_mask` takes."""
    return image_size(_mask_batch(mask))


def preprocess_mask(mask, height: int | None = None, width: int | None = None, vae_scale_factor: int = 8,
                    resize_mode: str = "default", crops_coords: tuple[int, int, int, int] | None = None,
                    latent_channels: int = 4, binarize: bool = True) -> torch.Tensor:
    """An inpainting mask as a binary float tensor (N, 1, height, width): 1 = repaint, 0 = keep.

    PIL masks are cropped to ``crops_coords`` (optional), resized as in :func:`resize_pil` and
    converted to grayscale; arrays and tensors (values in [0, 1]) are resized with nearest-neighbour.
    The size defaults to the mask's own; both are rounded down to a multiple of ``vae_scale_factor``.
    Values >= 0.5 become 1, the rest 0 (without ``binarize``, values in [0, 1] are kept). A tensor
    with ``latent_channels`` channels is returned as it is.
    """
    batch = _mask_batch(mask)
    if isinstance(batch, torch.Tensor) and batch.shape[1] == latent_channels:
        return batch
    if isinstance(batch, list):
        if crops_coords is not None:
            batch = [m.crop(crops_coords) for m in batch]
        height = _multiple_below(height or batch[0].height, vae_scale_factor)
        width = _multiple_below(width or batch[0].width, vae_scale_factor)
        batch = [np.asarray(convert_pil(resize_pil(eight_bit(m), width, height, resize_mode), "L"),
                            dtype=np.float32) / 255.0 for m in batch]
        batch = numpy_to_tensor(np.stack(batch))
    else:
        if resize_mode != "default":
            raise ValueError(f"resize_mode {resize_mode!r} needs PIL images")
        batch = _resize_nearest(batch, _multiple_below(height or batch.shape[2], vae_scale_factor),
                                _multiple_below(width or batch.shape[3], vae_scale_factor))
    return binarized(batch) if binarize else batch


def binarized(images: torch.Tensor) -> torch.Tensor:
    """1 where a value is >= 0.5, else 0 (a new tensor of the same dtype)."""
    return (images >= 0.5).to(images.dtype)


def mask_crop_region(mask: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels, widened by ``pad`` and then to the
    aspect ratio ``width / height`` (shifted to stay inside the mask)."""
    values = np.asarray(convert_pil(mask, "L"))
    h, w = values.shape
    cols, rows = np.flatnonzero(values.any(axis=0)), np.flatnonzero(values.any(axis=1))
    left, right = (cols[0], cols[-1] + 1) if cols.size else (w, 0)
    top, bottom = (rows[0], rows[-1] + 1) if rows.size else (h, 0)
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(right + pad, w)), int(min(bottom + pad, h))
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / target - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * target - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(start: int, end: int, extra: int, limit: int) -> tuple[int, int]:
    start, end = start - extra // 2, end + extra - extra // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def overlay_inpainted(mask: Image.Image, original: Image.Image, image: Image.Image,
                      crops_coords: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Paste the unmasked pixels of ``original`` over ``image``; with ``crops_coords``, ``image`` is
    the inpainted crop and is first resized into that box of a canvas the size of ``original``."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(convert_pil(original, "RGB").convert("RGBa"), mask=ImageOps.invert(convert_pil(mask, "L")))
    kept = kept.convert("RGBA")
    if crops_coords is not None:
        x1, y1, x2, y2 = crops_coords
        canvas = Image.new("RGBA", (width, height))
        canvas.paste(resize_pil(image, x2 - x1, y2 - y1, "crop"), (x1, y1))
        image = canvas.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


def _multiple_below(size: int, multiple: int) -> int:
    return size - size % multiple


def _resize_nearest(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(images, size=(height, width))


def preprocess_images(image, height: int | None = None, width: int | None = None, multiple: int = 8,
                      latent_channels: int | None = 4, normalize: bool = True, resize_mode: str = "default",
                      crops_coords: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Pipeline image input to a float tensor (N, 3, H, W) in [-1, 1], as the reference prepares it.

    ``image``: a PIL image (any mode: converted to RGB, see :func:`convert_pil`), a numpy array
    (H, W[, C]) or (N, H, W, C) in [0, 1] (integer arrays are scaled by their type's maximum), a
    tensor (C, H, W) or (N, C, H, W) in [0, 1], or a list of one of these. Arrays and tensors have
    3 channels or 1 (grayscale, repeated); others are refused. The size is ``height`` x ``width``, by
    default the input's, rounded down to a multiple of ``multiple`` (the VAE scale factor); PIL
    images are resized with Lanczos, arrays and tensors with nearest-neighbour interpolation.
    A tensor with ``latent_channels`` channels is taken to be latents and returned unchanged. A tensor
    or array with negative values is taken to be in [-1, 1] already (with a warning, as the reference).
    PIL images only: ``crops_coords`` (x1, y1, x2, y2) crops first; ``resize_mode`` as in :func:`resize_pil`.
    """
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError("image is an empty list")
    first = images[0]
    if resize_mode != "default" and not isinstance(first, Image.Image):
        raise ValueError(f"resize_mode {resize_mode!r} needs PIL images")
    if isinstance(first, Image.Image):
        if not all(isinstance(i, Image.Image) for i in images):
            raise ValueError("image: a list must hold images of one kind")
        images = [convert_pil(i, "RGB") for i in images]
        if crops_coords is not None:
            images = [i.crop(crops_coords) for i in images]
        height = _multiple_below(height or images[0].height, multiple)
        width = _multiple_below(width or images[0].width, multiple)
        arrays = [np.array(resize_pil(i, width, height, resize_mode)).astype(np.float32) / 255.0 for i in images]
        batch = numpy_to_tensor(np.stack(arrays, axis=0))
    elif isinstance(first, np.ndarray):
        batch = np.concatenate(images, axis=0) if first.ndim == 4 else np.stack(images, axis=0)
        batch = _pixel_channels(numpy_to_tensor(_array_values(batch)), "image", None)
        batch = _resize_nearest(batch, _multiple_below(height or batch.shape[2], multiple),
                                _multiple_below(width or batch.shape[3], multiple))
    elif isinstance(first, torch.Tensor):
        batch = torch.cat(images, dim=0) if first.ndim == 4 else torch.stack(images, dim=0)
        if latent_channels is not None and batch.shape[1] == latent_channels:
            return batch
        batch = _pixel_channels(batch, "image", latent_channels)
        batch = _resize_nearest(batch, _multiple_below(height or batch.shape[2], multiple),
                                _multiple_below(width or batch.shape[3], multiple))
    else:
        raise ValueError(f"image must be a PIL image, numpy array or torch tensor (or a list), got {type(first).__name__}")
    if normalize and batch.min() < 0:
        warnings.warn("image has values below 0; taking it to be in [-1, 1] already (expected [0, 1])",
                      FutureWarning, stacklevel=2)
        normalize = False
    return 2.0 * batch - 1.0 if normalize else batch


def tensor_to_numpy(images: torch.Tensor) -> np.ndarray:
    """An (N, C, H, W) tensor to a float32 (N, H, W, C) array on the CPU."""
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def numpy_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) array to an (N, C, H, W) tensor."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(images.transpose(0, 3, 1, 2))
