"""Synthetic micro-CT-like slices: a grey matrix with dark pores and bright particles,
under a smooth intensity drift, blur and noise, with their ground-truth labels.

Labels: 0 matrix, 1 pore, 2 particle.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASS_NAMES = ("matrix", "pore", "particle")
MATRIX_LEVEL, PORE_LEVEL, PARTICLE_LEVEL = 0.45, 0.15, 0.8


def _draw_ellipses(labels: np.ndarray, label: int, count: int, radius_range: tuple[float, float], rng) -> None:
    height, width = labels.shape
    rows, cols = np.ogrid[:height, :width]
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(*radius_range, size=2)
        angle = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - max(ry, rx) - 1, 0)), int(min(cy + max(ry, rx) + 2, height))
        x0, x1 = int(max(cx - max(ry, rx) - 1, 0)), int(min(cx + max(ry, rx) + 2, width))
        dy, dx = rows[y0:y1] - cy, cols[:, x0:x1] - cx
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        inside = (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
        labels[y0:y1, x0:x1][inside] = label


def _drift(shape: tuple[int, int], rng) -> np.ndarray:
    """Smooth multiplicative intensity drift (beam/detector non-uniformity), about 0.75..1.25."""
    height, width = shape
    coarse = rng.normal(0.0, 1.0, size=(4, 4))
    smooth = ndimage.zoom(coarse, (height / 4, width / 4), order=3)[:height, :width]
    ramp = np.linspace(-1, 1, width)[None, :] * rng.uniform(-0.15, 0.15)
    return 1.0 + 0.08 * smooth + ramp


def synthetic_slice(shape: tuple[int, int], rng: np.random.Generator, noise: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """One slice and its labels.

    Returns:
        image ``[H, W]`` float32 (about 0..1 before drift and noise), labels ``[H, W]`` uint8.
    """
    labels = np.zeros(shape, dtype=np.uint8)
    area = shape[0] * shape[1]
    _draw_ellipses(labels, 1, rng.poisson(area / 4000) + 1, (2.0, 9.0), rng)
    _draw_ellipses(labels, 2, rng.poisson(area / 6000) + 1, (3.0, 16.0), rng)
    levels = np.array([MATRIX_LEVEL, PORE_LEVEL, PARTICLE_LEVEL], dtype=np.float32)
    image = ndimage.gaussian_filter(levels[labels], sigma=1.0) * _drift(shape, rng)
    image = image + rng.normal(0.0, noise, size=shape)
    return image.astype(np.float32), labels


def to_detector_counts(image: np.ndarray, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Map a float slice to a detector's integer range with a random gain and offset."""
    info = np.iinfo(dtype)
    span = info.max - info.min
    gain = rng.uniform(0.4, 0.7) * span
    offset = info.min + rng.uniform(0.05, 0.2) * span
    return np.clip(image * gain + offset, info.min, info.max).astype(dtype)
