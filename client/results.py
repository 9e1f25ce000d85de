"""What the client hands back: a frame's or volume's outputs, and the network behind them."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class NetworkInfo:
    """The network behind a pipeline: ``[B, in_channels, *tile]`` -> ``[B, num_classes, *tile]``."""

    name: str
    in_channels: int
    num_classes: int
    tile: tuple[int, ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.tile)


@dataclasses.dataclass
class SegmentationResult:
    """One frame's (or volume's) outputs: mask ``[*spatial]`` uint8; probabilities
    ``[K, *spatial]`` float32 and contour ``[*spatial]`` uint8 when asked for, else None;
    ``chunks``: requests it took (volumes cut by ``segment_volume``)."""

    mask: np.ndarray
    probabilities: np.ndarray | None = None
    contour: np.ndarray | None = None
    chunks: int = 1
