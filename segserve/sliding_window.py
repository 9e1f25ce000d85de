"""Sliding-window inference over a whole frame, with tile batches sent to a predictor.

The algorithm is MONAI's :func:`monai.inferers.sliding_window_inference`: it pads frames
smaller than a tile, walks the tiles in batches of ``sw_batch_size`` and accumulates the
blended result in one full-size buffer, so no more than one batch of tile outputs is held at
a time. On the server the predictor is a BLS call to the network model.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.inferers import sliding_window_inference

from segserve.network_spec import NetworkSpec
from segserve.options import InputError, OptionError, PipelineOptions

TilePredictor = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_SW_BATCH_SIZE = 8


def resolve_sw_batch_size(options: PipelineOptions, network: NetworkSpec, default: int = DEFAULT_SW_BATCH_SIZE) -> int:
    """Tiles per network request: the option, else ``default`` (the pipeline's, per device),
    bounded by the network's max batch size."""
    if options.sw_batch_size is None:
        return min(default, network.max_batch_size)
    if options.sw_batch_size > network.max_batch_size:
        raise OptionError(
            f"sw_batch_size {options.sw_batch_size} exceeds the max batch size "
            f"{network.max_batch_size} of network {network.name!r}"
        )
    return options.sw_batch_size


def pad_batch(tiles: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[B, C, *tile]`` -> ``[max(B, batch_size), C, *tile]``, zero tiles appended: the last
    partial batch of a frame in the shape of the others (engines that specialise on shapes
    run one). The caller drops the padded tiles' outputs."""
    missing = batch_size - tiles.shape[0]
    if missing <= 0:
        return tiles
    return torch.cat([tiles, tiles.new_zeros((missing, *tiles.shape[1:]))])


def blended_logits(
    image: torch.Tensor, network: NetworkSpec, predictor: TilePredictor, options: PipelineOptions,
    sw_batch_size: int | None = None,
) -> torch.Tensor:
    """Run the network over a normalised frame with overlapping tiles and blend the tiles.

    Args:
        image: ``[C, *spatial]`` float32 in [0, 1], on any device.
        network: tile size, channel and class counts of the network.
        predictor: maps ``[B, C, *tile_size]`` float32 to ``[B, K, *tile_size]`` float32 logits.
        options: ``overlap``, ``blend`` and ``sw_batch_size``.
        sw_batch_size: tiles per predictor call; None resolves it from the options.

    Returns:
        ``[K, *spatial]`` float32 blended logits on the image's device.
    """
    if image.ndim != network.spatial_dims + 1:
        raise InputError(
            f"network {network.name!r} is {network.spatial_dims}D; IMAGE shape {list(image.shape)} does not match"
        )
    if image.shape[0] != network.in_channels:
        raise InputError(
            f"network {network.name!r} takes {network.in_channels} channel(s), IMAGE has {image.shape[0]}"
        )
    logits = sliding_window_inference(
        image.unsqueeze(0),
        roi_size=network.tile_size,
        sw_batch_size=sw_batch_size or resolve_sw_batch_size(options, network),
        predictor=predictor,
        overlap=options.overlap,
        mode=options.blend,
    )
    return logits[0]
