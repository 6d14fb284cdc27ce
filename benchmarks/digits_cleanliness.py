"""Speckle in generated digits: high-frequency energy against the real digits the model learned from.

A sample's high-frequency energy is the mean squared difference between the image (values in
[0, 1]) and its 3x3 median filter (edges replicated): the part of the image made of isolated
pixels, which is what salt-and-pepper speckle is. Strokes and their edges, sharp or blurred,
survive a median filter and add little. A sample counts as *speckled* when that energy exceeds the
energy of every one of the 1,797 real digits of ``sklearn.datasets.load_digits`` taken through the
same 8 -> 16 resizing as the training data (the real-digit ceiling, 0.0034 at 16x16).

(The plain squared Laplacian was tried first: it also counts crisp stroke edges, and flagged a
quarter of visibly clean samples that were only sharper than the blurred real digits.)

Light on purpose (numpy and torch; scikit-learn only for the ceiling) so that tests import it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Steps per sampler name for the speckle checks: 25 (the demo's), more where a sampler needs it
#: (KDPM2 and its ancestral form still leave pixel noise at 25 steps, as they do in diffusers).
SAMPLER_STEPS = {"dpm2": 50, "dpm2_a": 50}
DEFAULT_STEPS = 25


def sampler_steps(name: str) -> int:
    """The step count the speckle checks use for sampler ``name``."""
    return SAMPLER_STEPS.get(name, DEFAULT_STEPS)


def high_frequency_energy(images) -> np.ndarray:
    """Mean squared residual of a 3x3 median filter per image, for grey (N, H, W, 1) or (N, 1, H, W) in [0, 1]."""
    batch = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if batch.ndim != 4 or 1 not in (batch.shape[1], batch.shape[-1]):
        raise ValueError(f"images must be grey (N, H, W, 1) or (N, 1, H, W), got shape {tuple(batch.shape)}")
    if batch.shape[1] != 1:
        batch = batch.permute(0, 3, 1, 2)
    windows = F.pad(batch, (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)
    median = windows.reshape(*batch.shape, 9).median(-1).values
    return (batch - median).pow(2).mean((1, 2, 3)).numpy()


def real_digit_ceiling(size: int = 16) -> float:
    """The highest high-frequency energy among the real digits resized to ``size`` like the training data."""
    from diffusekit.training.data import load_sklearn_digits

    real = (load_sklearn_digits(size).images + 1) / 2
    return float(high_frequency_energy(real).max())


def speckled(images, ceiling: float) -> np.ndarray:
    """Which images are speckled: more high-frequency energy than every real digit (``ceiling``)."""
    return high_frequency_energy(images) > ceiling
