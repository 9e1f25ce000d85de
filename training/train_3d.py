"""Train the default 3D network on synthetic CT-like volumes and save a small checkpoint.

    python -m training.train_3d --out training/checkpoints/unet3d_organs

writes ``<out>.pt`` (state dict) and ``<out>.json`` (architecture, arguments, tile, classes),
the pair ``python -m export`` takes. Volumes are normalised as the server does by default
(whole-volume 1st..99th percentiles), then cropped to tiles.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from segserve.options import PipelineOptions
from segserve.preprocess import normalize
from segserve.reference import reference_logits
from training.synthetic_3d import CLASS_NAMES, synthetic_volume
from training.train_2d import dice_scores, train_and_save

ARCHITECTURE_ARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": len(CLASS_NAMES),
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    # Batch norm, not MONAI's default instance norm: a 64^3 window inside a large organ is
    # nearly flat, and per-window normalisation erases what tells organ from tissue (measured
    # on held-out 128^3 volumes, sliding window: organ Dice 0.70 with instance norm after 1000
    # steps, 0.97 with batch norm after 500).
    "norm": "batch",
}
TILE = (64, 64, 64)
VOLUME = (96, 96, 96)


def training_batch(batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles cropped from whole normalised volumes.

    Returns:
        images ``[B, 1, *TILE]`` float32, labels ``[B, 1, *TILE]`` int64.
    """
    images, labels = [], []
    for _ in range(batch_size):
        image, label = synthetic_volume(VOLUME, rng, noise_hu=rng.uniform(10.0, 30.0))
        normalized = normalize(torch.from_numpy(image)[None], PipelineOptions())
        corner = [int(rng.integers(0, v - t + 1)) for v, t in zip(VOLUME, TILE)]
        crop = tuple(slice(c, c + t) for c, t in zip(corner, TILE))
        images.append(normalized[(slice(None), *crop)])
        labels.append(torch.from_numpy(label[crop][None].astype(np.int64)))
    return torch.stack(images), torch.stack(labels)


@torch.no_grad()
def evaluate(network: torch.nn.Module, seed: int) -> dict[str, float]:
    """Per-class Dice on fresh 128^3 volumes, predicted as the server does (sliding window)."""
    rng = np.random.default_rng(seed + 1000)

    def predictions():
        for _ in range(3):
            image, label = synthetic_volume((128, 128, 128), rng)
            yield reference_logits(image[None], network, TILE).argmax(0).numpy(), label

    return dice_scores(predictions(), CLASS_NAMES)


def main(argv: list[str] | None = None) -> int:
    return train_and_save(argv, description=__doc__, out="training/checkpoints/unet3d_organs", steps=500,
                          batch_size=4, arguments=ARCHITECTURE_ARGS, tile=TILE, classes=CLASS_NAMES,
                          training_batch=training_batch, evaluate=evaluate)


if __name__ == "__main__":
    sys.exit(main())
