"""Volumes larger than one request: overlapping chunks on the server's tile grid, stitched so
the result equals one whole-volume request voxel for voxel.

The server blends windows at MONAI's positions (``monai.data.utils.dense_patch_slices``):
along an axis of length L with tile T and interval s = int(T * (1 - overlap)), windows start
at 0, s, 2s, ... and the last one is moved back to L - T. A chunk is cut from the start of one
of those windows to the end of a later one, so the server, sliding over the chunk alone,
places exactly the same windows there. A voxel is kept from a chunk only where every window
of the whole volume that covers it lies inside that chunk: there its blended value is computed
from the same windows, in the same order, as for the whole volume. Neighbouring chunks share
about one window (the overlap); their kept parts abut.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from segproto import DEFAULT_OVERLAP, scan_interval

# Voxels per chunk: a 512x512x256 volume (256 MiB of float32) still goes in one request.
DEFAULT_MAX_CHUNK_VOXELS = 512 * 512 * 256


class ChunkingError(ValueError):
    """Chunk settings that cannot give seams identical to a whole-volume request."""


@dataclasses.dataclass(frozen=True)
class AxisSpan:
    """One chunk along one axis: ``[start, stop)`` is sent, ``[keep_start, keep_stop)`` (volume
    coordinates, inside the sent part) is written into the result."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One request: ``sent`` cuts it from the volume, ``kept`` is the part written back, in
    volume coordinates (``sent_kept`` is the same part in chunk coordinates)."""

    index: int
    sent: tuple[slice, ...]
    kept: tuple[slice, ...]

    @property
    def sent_kept(self) -> tuple[slice, ...]:
        return tuple(slice(k.start - s.start, k.stop - s.start) for s, k in zip(self.sent, self.kept))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.sent)


def window_interval(length: int, tile: int, overlap: float) -> int:
    """MONAI's scan interval along one axis (``_get_scan_interval``)."""
    if tile == length:
        return tile
    return scan_interval(tile, overlap)


def effective_overlap(overlap: float | None) -> float:
    """The overlap a request runs with: ``overlap``, else the server's default."""
    return DEFAULT_OVERLAP if overlap is None else overlap


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start of every sliding window along one axis, as MONAI places them."""
    if length <= tile:
        return [0]  # MONAI pads a short axis to one tile
    interval = window_interval(length, tile, overlap)
    starts = []
    for index in itertools.count():
        if index * interval + tile >= length:
            starts.append(length - tile)
            return starts
        starts.append(index * interval)


def minimum_chunk_extent(tile: int, overlap: float) -> int:
    """Smallest chunk extent along an axis that can still hand over to a next chunk."""
    interval = scan_interval(tile, overlap)
    return math.ceil(tile / interval) * interval + tile


def split_axis(length: int, tile: int, overlap: float, max_extent: int, min_shared: int = 0) -> list[AxisSpan]:
    """Cut one axis into chunks of at most ``max_extent`` voxels on the window grid.

    Args:
        min_shared: at least this many voxels are sent twice at each seam (more than the
            grid needs only costs time; the result is the same).

    Raises:
        ChunkingError: ``max_extent`` too small for the tile (the message says the minimum).
    """
    starts = window_starts(length, tile, overlap)
    if length <= max_extent:
        return [AxisSpan(0, length, 0, length)]
    if len(starts) == 1:
        raise ChunkingError(f"chunk extent {max_extent} cannot cut an axis of {length} voxels: one window of tile {tile} "
                            "covers it; use 0 (the whole axis)")
    smallest = minimum_chunk_extent(tile, overlap) + max(min_shared, 0)
    if max_extent < smallest:
        raise ChunkingError(f"chunk extent {max_extent} is too small for tile {tile} at overlap {overlap}: "
                            f"use at least {smallest} voxels")
    spans, first, keep_start = [], 0, 0
    while True:
        last = max(i for i in range(first, len(starts)) if starts[i] + tile - starts[first] <= max_extent)
        if last == len(starts) - 1:
            spans.append(AxisSpan(starts[first], length, keep_start, length))
            return spans
        # Voxels before the next window's start are covered only by windows of this chunk.
        keep_stop = starts[last + 1]
        spans.append(AxisSpan(starts[first], starts[last] + tile, keep_start, keep_stop))
        # The next chunk starts at the latest window whose predecessor ends by keep_stop, so
        # every voxel it keeps sees all its windows.
        first = max(j for j in range(first + 1, last + 2)
                    if starts[j - 1] + tile <= keep_stop and starts[last] + tile - starts[j] >= min_shared)
        keep_start = keep_stop


@dataclasses.dataclass(frozen=True)
class AxisCut:
    """One way to cut an axis: ``split_axis`` with ``max_extent`` sends ``count`` chunks along
    it, the longest ``longest`` voxels, ``total`` voxels in all (shared margins twice)."""

    max_extent: int
    longest: int
    total: int
    count: int


def axis_cuts(length: int, tile: int, overlap: float, min_shared: int = 0) -> list[AxisCut]:
    """Every distinct cut of one axis on the window grid (a chunk runs from one window's start
    to a later one's end, so only those spans matter as extents), but those another cut beats
    in both ``longest`` and ``total``."""
    starts = window_starts(length, tile, overlap)
    smallest = minimum_chunk_extent(tile, overlap) + max(min_shared, 0)
    # split_axis refuses extents below `smallest`, which its own chunks may undercut.
    size = min(tile, length)
    extents = {length, smallest} | {b + size - a for a in starts for b in starts if b + size - a >= smallest}
    cuts = set()
    for extent in extents:
        try:
            spans = split_axis(length, tile, overlap, extent, min_shared)
        except ValueError:  # too small for the tile, or for the shared margin on this grid
            continue
        lengths = [span.stop - span.start for span in spans]
        cuts.add(AxisCut(extent, max(lengths), sum(lengths), len(lengths)))
    return [c for c in cuts if not any(o.longest <= c.longest and o.total < c.total
                                       or o.longest < c.longest and o.total <= c.total for o in cuts)]


def default_max_extents(shape: tuple[int, ...], tile: tuple[int, ...], overlap: float,
                        max_voxels: int, min_shared: int = 0) -> tuple[int, ...]:
    """Chunk extents whose chunks send the fewest voxels in all (halos included, so the least
    network work), none above ``max_voxels``; among equals, the fewest chunks, then the slowest
    axes cut first. A search over every axis's cuts (``axis_cuts``: tens each). When every
    choice has a chunk above ``max_voxels``, the one with the smallest (``plan_chunks``
    refuses it, naming its size)."""
    per_axis = [axis_cuts(n, t, overlap, min_shared) for n, t in zip(shape, tile)]
    choices = list(itertools.product(*per_axis))
    within = [c for c in choices if math.prod(cut.longest for cut in c) <= max_voxels]
    if not within:
        return tuple(min(cuts, key=lambda cut: cut.longest).max_extent for cuts in per_axis)
    # Among equals, the slowest axes cut first: whole rows and planes stay together.
    best = min(within, key=lambda c: (math.prod(cut.total for cut in c), math.prod(cut.count for cut in c),
                                      tuple(-cut.max_extent for cut in reversed(c))))
    return tuple(cut.max_extent for cut in best)


def plan_chunks(shape: tuple[int, ...], tile: tuple[int, ...], overlap: float = DEFAULT_OVERLAP,
                max_extents: tuple[int | None, ...] | None = None, max_voxels: int = DEFAULT_MAX_CHUNK_VOXELS,
                min_shared: int = 0) -> list[Chunk]:
    """Chunks covering a volume of spatial ``shape`` for a network with ``tile``.

    Args:
        max_extents: largest chunk extent per axis (None or 0: the whole axis); default:
            the extents that send the fewest voxels with no chunk above ``max_voxels``
            (``default_max_extents``).
        min_shared: voxels sent twice at each seam, at least (default: what the grid needs).

    Raises:
        ChunkingError: a bad setting, named with its value; a ``max_voxels`` that even the
            smallest chunks exceed (the volume is larger and cannot be cut finer).
    """
    if len(tile) != len(shape):
        raise ChunkingError(f"volume shape {list(shape)} and tile {list(tile)} differ in rank")
    if not 0 <= overlap < 1:
        raise ChunkingError(f"overlap must be in [0, 1), got {overlap}")
    if max_voxels < 1:
        raise ChunkingError(f"max_voxels must be >= 1, got {max_voxels}")
    if min_shared < 0:
        raise ChunkingError(f"min_shared (--chunk-overlap) must be >= 0, got {min_shared}")
    if max_extents is None:
        extents = default_max_extents(shape, tile, overlap, max_voxels, min_shared)
    else:
        if len(max_extents) != len(shape):
            raise ChunkingError(f"chunk shape {list(max_extents)} needs {len(shape)} values")
        if any(e is not None and e < 0 for e in max_extents):
            raise ChunkingError(f"chunk shape values must be >= 0, got {list(max_extents)}")
        extents = tuple(e if e else n for e, n in zip(max_extents, shape))
    per_axis = [split_axis(n, t, overlap, e, min_shared) for n, t, e in zip(shape, tile, extents)]
    largest = [max(s.stop - s.start for s in spans) for spans in per_axis]
    if max_extents is None and math.prod(largest) > max_voxels:
        raise ChunkingError(f"max_voxels (--max-chunk-voxels) {max_voxels} is below the smallest chunk this volume "
                            f"can be cut into for tile {list(tile)} at overlap {overlap}: {largest} = "
                            f"{math.prod(largest)} voxels; raise it, or give the chunk shape")
    return [
        Chunk(index, tuple(slice(s.start, s.stop) for s in spans), tuple(slice(s.keep_start, s.keep_stop) for s in spans))
        for index, spans in enumerate(itertools.product(*per_axis))
    ]
