"""The client's torch-free keep_largest and contour (chunked volumes) equal the server's MONAI
functions on the same masks: 2D and 3D, several classes, equal-sized components (ties)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.postprocess import keep_largest_components, label_contour
from segserve import postprocess as server


def random_masks(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, count: int):
    """Blobby masks (a smoothed random field cut into classes) plus salt: many components."""
    from scipy import ndimage

    for _ in range(count):
        field = ndimage.uniform_filter(rng.random(shape), size=3)
        edges = np.quantile(field, np.linspace(0, 1, num_classes + 1)[1:-1])
        mask = np.digitize(field, edges).astype(np.uint8)
        salt = rng.random(shape) < 0.02
        mask[salt] = rng.integers(0, num_classes, int(salt.sum()), dtype=np.uint8)
        yield mask


def tie_mask(ndim: int) -> np.ndarray:
    """Two equal components of class 1 and two of class 2: the tie goes the server's way."""
    mask = np.zeros((9,) * ndim, dtype=np.uint8)
    mask[(slice(0, 2),) * ndim] = 1
    mask[(slice(4, 6),) * ndim] = 1
    mask[(slice(7, 9),) * ndim] = 2
    mask[(slice(0, 2), *(slice(7, 9),) * (ndim - 1))] = 2
    return mask


@pytest.mark.parametrize("shape, num_classes", [((61, 47), 3), ((64, 64), 2), ((17, 23, 19), 3), ((20, 20, 20), 4)])
def test_keep_largest_and_contour_equal_the_servers(shape, num_classes):
    rng = np.random.default_rng(sum(shape) + num_classes)
    changed = 0
    for mask in [*random_masks(rng, shape, num_classes, 4), tie_mask(len(shape))]:
        expected = server.keep_largest_components(torch.from_numpy(mask.copy()), num_classes).numpy()
        kept = keep_largest_components(mask, num_classes)
        assert kept.dtype == np.uint8 and np.array_equal(kept, expected)
        changed += not np.array_equal(kept, mask)
        assert np.array_equal(label_contour(mask), server.label_contour(torch.from_numpy(mask.copy())).numpy())
        assert np.array_equal(label_contour(kept), server.label_contour(torch.from_numpy(expected)).numpy())
    assert changed == 5  # every mask had smaller components to drop: the comparison is not vacuous


def test_empty_and_single_class_masks_are_left_alone():
    empty = np.zeros((12, 13), dtype=np.uint8)
    assert np.array_equal(keep_largest_components(empty, 3), empty)
    assert not label_contour(empty).any()
    full = np.ones((5, 6, 7), dtype=np.uint8)
    assert np.array_equal(keep_largest_components(full, 2), full)
    assert np.array_equal(label_contour(full), server.label_contour(torch.from_numpy(full)).numpy())
