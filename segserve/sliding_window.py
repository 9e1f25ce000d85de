"""Sliding-window inference over a whole frame, with tile batches sent to a predictor.

The algorithm is MONAI's :func:`monai.inferers.sliding_window_inference`: it pads frames
smaller than a tile, walks the tiles in batches of ``sw_batch_size`` and accumulates the
blended result in one full-size buffer, so no more than one batch of tile outputs is held at
a time. On the server the predictor is a BLS call to the network model.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from monai.inferers import sliding_window_inference

from segproto import looks_channels_last, scan_interval
from segserve.network_spec import NetworkSpec
from segserve.options import InputError, OptionError, PipelineOptions

TilePredictor = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_SW_BATCH_SIZE = 8
# The most windows one request may take: as many as the largest frame the server takes
# (max_pixels) has at this overlap, 16 per tile-sized area in 2D, 64 in 3D. Beyond it one
# request could hold the server for hours: overlap 0.99 cuts a 1024² frame into 804,609
# windows of 128².
LARGEST_OVERLAP_OF_THE_LARGEST_FRAME = 0.75


def window_count(spatial_shape: tuple[int, ...], tile_size: tuple[int, ...], overlap: float) -> int:
    """How many windows MONAI's ``sliding_window_inference`` runs on a frame (one smaller than
    a tile is padded to it; ``dense_patch_slices`` with its scan interval, counted, not listed)."""
    count = 1
    for size, tile in zip(spatial_shape, tile_size):
        count *= math.ceil(max(size - tile, 0) / scan_interval(tile, overlap)) + 1
    return count


def window_limit(max_pixels: int | None, tile_size: tuple[int, ...]) -> int | None:
    """The most windows one request may take: the largest frame's at
    ``LARGEST_OVERLAP_OF_THE_LARGEST_FRAME``; None without a pixel limit."""
    if max_pixels is None:
        return None
    per_tile_area = round(1 / (1 - LARGEST_OVERLAP_OF_THE_LARGEST_FRAME)) ** len(tile_size)
    return math.ceil(max_pixels / math.prod(tile_size)) * per_tile_area


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


def channels_last_hint(shape: tuple[int, ...], in_channels: int) -> str:
    """For an image of the wrong channel count whose last axis is short and first one long (an
    RGB ``[H, W, 3]`` picture sent as ``[C, H, W]``): what to send instead; else ""."""
    if not looks_channels_last(shape):
        return ""
    axes = ", ".join("DHW"[-(len(shape) - 1):])
    instead = (f"one channel of it, or it in grey, as [{axes}]" if in_channels == 1
               else f"numpy.moveaxis(image, -1, 0), [C, {axes}]")
    return f" ({list(shape)} looks like a channels-last [{axes}, C] image: send {instead})"


def blended_logits(
    image: torch.Tensor, network: NetworkSpec, predictor: TilePredictor, options: PipelineOptions,
    sw_batch_size: int | None = None, max_windows: int | None = None,
) -> torch.Tensor:
    """Run the network over a normalised frame with overlapping tiles and blend the tiles.

    Args:
        image: ``[C, *spatial]`` float32 in [0, 1], on any device.
        network: tile size, channel and class counts of the network.
        predictor: maps ``[B, C, *tile_size]`` float32 to ``[B, K, *tile_size]`` float32 logits.
        options: ``overlap``, ``blend`` and ``sw_batch_size``.
        sw_batch_size: tiles per predictor call; None resolves it from the options.
        max_windows: the most windows the frame may take (``window_limit``); None: no limit.

    Returns:
        ``[K, *spatial]`` float32 blended logits on the image's device.
    """
    if image.ndim != network.spatial_dims + 1:
        dims = network.spatial_dims
        raise InputError(f"network {network.name!r} is {dims}D; IMAGE shape {list(image.shape)} does not match "
                         f"({dims}D networks serve through segment_{dims}d: client --model segment_{dims}d"
                         f"{', or segment-volume' if dims == 3 else ''})")
    if image.shape[0] != network.in_channels:
        raise InputError(f"network {network.name!r} takes {network.in_channels} channel(s), IMAGE has {image.shape[0]}"
                         f"{channels_last_hint(tuple(image.shape), network.in_channels)}")
    windows = window_count(tuple(image.shape[1:]), network.tile_size, options.overlap)
    if max_windows is not None and windows > max_windows:
        shape = "x".join(str(n) for n in image.shape[1:])
        raise OptionError(f"overlap {options.overlap} cuts this {shape} frame into {windows} windows of "
                          f"{'x'.join(str(n) for n in network.tile_size)}, above the limit of {max_windows} per request; "
                          "use a smaller overlap")
    logits = sliding_window_inference(
        image.unsqueeze(0),
        roi_size=network.tile_size,
        sw_batch_size=sw_batch_size or resolve_sw_batch_size(options, network),
        predictor=predictor,
        overlap=options.overlap,
        mode=options.blend,
    )
    return logits[0]
