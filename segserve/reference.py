"""In-process reference: what the server must reproduce, MONAI ``sliding_window_inference``
run directly on a network, after the same preprocessing."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from segserve.options import PipelineOptions
from segserve.preprocess import normalize
from segserve.sliding_window import DEFAULT_SW_BATCH_SIZE


@torch.no_grad()
def reference_logits(
    frame: np.ndarray | torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    tile_size: tuple[int, ...],
    options: PipelineOptions = PipelineOptions(),
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``[C, *spatial]`` frame -> ``[K, *spatial]`` float32 blended logits on ``device``:
    the pipeline's normalisation, then MONAI ``sliding_window_inference`` with ``network``."""
    image = normalize(torch.as_tensor(frame).to(device), options)
    logits = sliding_window_inference(
        image.unsqueeze(0), roi_size=tile_size, sw_batch_size=options.sw_batch_size or DEFAULT_SW_BATCH_SIZE,
        predictor=network, overlap=options.overlap, mode=options.blend,
    )
    return logits[0]


def reference_probabilities(
    frame: np.ndarray | torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    tile_size: tuple[int, ...],
    options: PipelineOptions = PipelineOptions(),
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``[C, *spatial]`` frame (any supported dtype) -> ``[K, *spatial]`` float32 softmax on the CPU.

    ``device`` is where the network runs; compare a server with its own device (CPU and GPU
    convolutions differ by ~1e-3 in the logits, past the 1e-4 parity bound).
    """
    return torch.softmax(reference_logits(frame, network, tile_size, options, device), dim=0).cpu()
