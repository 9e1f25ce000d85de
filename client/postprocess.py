"""``keep_largest`` and ``contour`` of a stitched mask, without torch (numpy + scipy).

The server computes both with MONAI (``KeepLargestConnectedComponent``, ``LabelToContour``);
a chunked volume needs them once more on the whole stitched mask, on the client. These are
the same algorithms, proven equal on the same masks (``tests/test_client_postprocess.py``):
full connectivity, the largest component chosen as MONAI chooses it (ties included), and the
Laplace stencil with zero padding.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(foreground: np.ndarray) -> np.ndarray:
    """``[*spatial]`` bool -> bool mask of its largest connected component (full
    connectivity; MONAI's ``get_largest_connected_component_mask`` selection)."""
    features, count = ndimage.label(foreground, structure=np.ones((3,) * foreground.ndim, dtype=bool))
    if count <= 1:
        return foreground.astype(bool)
    counts = np.bincount(features.reshape(-1))
    counts[0] = 0
    keep = np.zeros(counts.shape[0], dtype=bool)
    keep[np.argsort(counts)[::-1][:1]] = True
    return keep[features]


def keep_largest_components(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``[*spatial]`` uint8 class mask: the largest connected component of each foreground
    class (1..K-1) is kept, the rest of that class becomes 0 (classes independent)."""
    kept = mask.copy()
    for label in range(1, num_classes):
        foreground = mask == label
        if foreground.any():
            kept[foreground & ~largest_component(foreground)] = 0
    return kept


def label_contour(mask: np.ndarray) -> np.ndarray:
    """``[*spatial]`` uint8 class mask -> its border pixels keeping their class, 0 inside
    (Laplace stencil, 8 or 26 at the centre and -1 around, zero padding, edge where > 0)."""
    kernel = -np.ones((3,) * mask.ndim, dtype=np.float32)
    kernel[(1,) * mask.ndim] = 3**mask.ndim - 1
    response = ndimage.correlate(mask.astype(np.float32), kernel, mode="constant", cval=0.0)
    return np.where(response > 0, mask, 0).astype(np.uint8)
