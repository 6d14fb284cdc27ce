"""Training data: an image folder, in-memory arrays, or the sklearn 8x8 digits, as tensors in [-1, 1]."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import CLASS_LABELS_FILE

SKLEARN_DIGITS = "sklearn-digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ImageDataset:
    """Images (N, C, H, W) in [-1, 1], optional integer labels (N,) and the class names."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else len(self.class_names or []) or int(self.labels.max()) + 1


def save_class_names(out: str | os.PathLike, dataset: ImageDataset) -> Path:
    """Write ``out/class_labels.json``: the class name of each label (label i -> entry i)."""
    names = dataset.class_names or [str(i) for i in range(dataset.num_classes)]
    path = Path(out) / CLASS_LABELS_FILE
    path.write_text(json.dumps(names, indent=1) + "\n", encoding="utf-8")
    return path


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize a batch (N, C, H, W) to a square ``resolution`` (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    shrinking = min(images.shape[-2:]) > resolution
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=shrinking)


def load_sklearn_digits(resolution: int = 16) -> ImageDataset:
    """The 1,797 8x8 digits of scikit-learn, scaled from 0..16 to [-1, 1] and resized to ``resolution``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the sklearn-digits dataset needs scikit-learn: pip install 'diffusekit[train]'") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return ImageDataset(resize(images, resolution), labels, [str(i) for i in range(10)])


def from_arrays(images, labels=None, resolution: int | None = None) -> ImageDataset:
    """A dataset from an array (N, H, W), (N, C, H, W) or (N, H, W, C) with values in [-1, 1]."""
    array = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.permute(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"images must be a non-empty array (N, H, W) or (N, C, H, W), got shape {tuple(array.shape)}")
    if array.min() < -1.0001 or array.max() > 1.0001:
        raise ValueError("images must hold values in [-1, 1]")
    label_tensor = None
    if labels is not None:
        label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
        if label_tensor.shape[0] != array.shape[0]:
            raise ValueError(f"got {label_tensor.shape[0]} labels for {array.shape[0]} images")
        if label_tensor.min() < 0:
            raise ValueError("labels must be non-negative integers")
    if resolution is not None:
        array = resize(array, resolution)
    return ImageDataset(array.contiguous(), label_tensor)


def load_image_folder(folder: str | os.PathLike, resolution: int, channels: int = 3) -> ImageDataset:
    """Every image under ``folder``, centre-cropped square and resized; loaded into memory.

    When the images sit in subfolders (``folder/<class>/*.png``) each subfolder is a class.
    """
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--data {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    tensors = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
        except OSError as err:
            raise ValueError(f"{path}: cannot read image ({err})") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, channels)
        tensors.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
    images = torch.stack(tensors)
    parents = [p.parent.relative_to(root).as_posix() for p in files]
    if all(parent != "." for parent in parents):
        names = sorted(set(parents))
        labels = torch.tensor([names.index(parent) for parent in parents], dtype=torch.long)
        return ImageDataset(images, labels, names)
    return ImageDataset(images)


def load_dataset(data, resolution: int, labels=None, channels: int = 3) -> ImageDataset:
    """``data`` is ``"sklearn-digits"``, an image folder, an :class:`ImageDataset` or an array."""
    if isinstance(data, ImageDataset):
        return ImageDataset(resize(data.images, resolution), data.labels, data.class_names)
    if isinstance(data, str) and data == SKLEARN_DIGITS:
        return load_sklearn_digits(resolution)
    if isinstance(data, (str, os.PathLike)):
        return load_image_folder(data, resolution, channels)
    return from_arrays(data, labels, resolution)
