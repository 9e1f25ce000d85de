"""Synthetic CT-like volumes in Hounsfield units: a body of soft tissue in air holding
contrast-enhanced organ-like blobs with darker (hypodense) lesions inside, blurred and noisy.

Organs are large enough (a few % of the volume) that the server's default normalisation
(1st..99th percentile) keeps them apart from tissue.

Labels: 0 background (air and tissue), 1 organ, 2 lesion.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASS_NAMES = ("background", "organ", "lesion")
AIR_HU, TISSUE_HU, ORGAN_HU, LESION_HU = -1000.0, 40.0, 160.0, -80.0


def _ellipsoid(shape: tuple[int, int, int], centre, radii, rotation: np.ndarray) -> np.ndarray:
    """Boolean ``shape`` array, True inside the rotated ellipsoid."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), axis=-1)
    local = (grid - np.asarray(centre, dtype=np.float32)) @ rotation.astype(np.float32)
    return ((local / np.asarray(radii, dtype=np.float32)) ** 2).sum(axis=-1) <= 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def synthetic_volume(shape: tuple[int, int, int], rng: np.random.Generator,
                     noise_hu: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """One volume and its labels.

    Returns:
        image ``[D, H, W]`` float32 in HU (about -1000..160 before noise), labels ``[D, H, W]`` uint8.
    """
    size = np.asarray(shape, dtype=np.float32)
    body = _ellipsoid(shape, size / 2, size * rng.uniform(0.38, 0.48, size=3), np.eye(3))
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        organ = _ellipsoid(shape, size * rng.uniform(0.3, 0.7, size=3), size * rng.uniform(0.12, 0.24, size=3),
                           _random_rotation(rng))
        labels[organ & body] = 1
        for _ in range(rng.integers(1, 4)):
            centre = np.argwhere(organ)[rng.integers(0, organ.sum())] if organ.any() else size / 2
            lesion = _ellipsoid(shape, centre, np.full(3, rng.uniform(3.0, 8.0)), np.eye(3))
            labels[lesion & organ & body] = 2
    image = np.where(body, TISSUE_HU, AIR_HU).astype(np.float32)
    image[labels == 1] = ORGAN_HU
    image[labels == 2] = LESION_HU
    image = ndimage.gaussian_filter(image, sigma=1.0)
    image += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    return image.astype(np.float32), labels


def to_int16_hu(image: np.ndarray) -> np.ndarray:
    """HU volume as stored by CT scanners: int16."""
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)
