"""Segmenting one volume in chunks (``client.chunks``), several in flight, stitched in place.

What a chunk cannot know is settled on the whole volume: the intensity range (the server's
default, the 1st..99th percentile, is computed here over the whole volume and sent with every
chunk), the largest connected component (``keep_largest`` is applied after stitching, as the server
does it) and the contour (its 3x3x3 stencil would read a chunk's margin at the
seams, so it is taken of the stitched mask, again as the server does: ``client.postprocess``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from client.chunks import DEFAULT_MAX_CHUNK_VOXELS, Chunk, effective_overlap, plan_chunks
from client.connection import SegmentationError
from client.postprocess import keep_largest_components, label_contour
from client.results import SegmentationResult
from client.stream import DEFAULT_PATIENCE_S, check_inflight
from client.transports import as_channel_first

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks in all): (0, n) first, then each chunk


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """How a volume is cut. ``shape``: largest chunk extent per spatial axis (0 or None: the
    whole axis), default derived from ``max_voxels``; ``min_shared``: voxels sent twice at each
    seam, at least (default: one window's worth, what exact seams need)."""

    shape: tuple[int | None, ...] | None = None
    max_voxels: int = DEFAULT_MAX_CHUNK_VOXELS
    min_shared: int = 0


def whole_volume_range(image: np.ndarray) -> tuple[float, float] | None:
    """The server's default intensity range (1st and 99th percentile over all channels, or
    min..max where those coincide: a sparse volume), computed once for the whole volume; None
    for a constant volume."""
    lowest, low, high, highest = (float(v) for v in np.percentile(image.astype(np.float32, copy=False), [0.0, 1.0, 99.0, 100.0]))
    if low == high:
        low, high = lowest, highest
    return (low, high) if low < high else None


def chunked_request_options(image: np.ndarray, options: dict) -> tuple[dict, dict]:
    """(options sent with every chunk, options applied after stitching)."""
    sent = dict(options)
    after = {"keep_largest": bool(sent.pop("keep_largest", None)), "contour": bool(sent.pop("contour", None))}
    sent["overlap"] = effective_overlap(sent.get("overlap"))
    if sent.get("intensity_min") is None and sent.get("intensity_max") is None:
        window = whole_volume_range(image)
        if window is not None:
            sent["intensity_min"], sent["intensity_max"] = window
    return sent, after


def allocate_outputs(spatial_shape: tuple[int, ...], num_classes: int, options: dict) -> dict[str, np.ndarray]:
    outputs = {"mask": np.zeros(spatial_shape, dtype=np.uint8)}
    if options.get("probabilities"):
        outputs["probabilities"] = np.zeros((num_classes, *spatial_shape), dtype=np.float32)
    return outputs


def store_chunk(outputs: dict[str, np.ndarray], chunk: Chunk, result) -> None:
    """Copy the kept part of one chunk's outputs into the whole-volume outputs."""
    outputs["mask"][chunk.kept] = result.mask[chunk.sent_kept]
    if "probabilities" in outputs and result.probabilities is not None:
        outputs["probabilities"][(slice(None), *chunk.kept)] = result.probabilities[(slice(None), *chunk.sent_kept)]


def finish_whole_volume(outputs: dict[str, np.ndarray], num_classes: int, after: dict) -> None:
    """keep_largest, then the contour, on the stitched mask, as the server does (same
    algorithms without torch: ``client.postprocess``)."""
    if after["keep_largest"]:
        outputs["mask"] = keep_largest_components(outputs["mask"], num_classes)
    if after["contour"]:
        outputs["contour"] = label_contour(outputs["mask"])


def describe_chunk(chunk: Chunk) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in chunk.sent) + "]"


def send_chunks(client, image: np.ndarray, plan: list[Chunk], sent: dict, stream_settings: dict,
                store: Callable[[Chunk, SegmentationResult], None], progress: ProgressCallback | None) -> None:
    """Send each chunk of ``plan`` (of ``image`` ``[C, D, H, W]``) with the options ``sent``
    through ``client.segment_stream`` (retried as its frames are) and ``store`` each result.

    Raises:
        SegmentationError: a chunk failed after its retries (named by its voxel range when
            there are several; the server's message alone when the volume went whole).
    """
    items = ((c.index, lambda c=c: np.ascontiguousarray(image[(slice(None), *c.sent)])) for c in plan)
    stream = client.segment_stream(items, **stream_settings, **sent)
    try:
        for done, outcome in enumerate(stream, start=1):
            chunk = plan[outcome.index]
            if not outcome.ok:
                where = f"chunk {outcome.index + 1}/{len(plan)} {describe_chunk(chunk)} failed: " if len(plan) > 1 else ""
                raise SegmentationError(where + outcome.error, retryable=outcome.retryable)
            store(chunk, outcome.result)
            if progress:
                progress(done, len(plan))
    finally:
        stream.close()


def check_volume_settings(chunks, inflight: int, retries: int | None, progress) -> None:
    """Refuse bad settings before anything is sent (a small volume goes whole, so they would
    otherwise surface only on a large one)."""
    if not isinstance(chunks, ChunkSettings):
        raise TypeError(f"chunks must be a ChunkSettings (e.g. ChunkSettings(shape=(160, 0, 0))), got {chunks!r}")
    check_inflight(inflight)
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        raise ValueError(f"retries must be None or an integer >= 0, got {retries!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (done, total) or None, got {progress!r}")


def check_finite(image: np.ndarray) -> None:
    """Refuse a float volume ``[C, D, H, W]`` holding NaN or Inf before any chunk is sent: the
    server refuses them chunk by chunk, so a NaN in the last chunk came after all the others.

    Raises:
        ValueError: how many voxels, the first one's position, what to do.
    """
    if not np.issubdtype(image.dtype, np.floating):
        return
    bad = [np.count_nonzero(~np.isfinite(image[:, z])) for z in range(image.shape[1])]  # a slice at a time
    if not any(bad):
        return
    z = next(i for i, count in enumerate(bad) if count)
    _, y, x = np.argwhere(~np.isfinite(image[:, z]))[0]
    raise ValueError(f"{sum(bad)} NaN or Inf voxel(s), the first at [z={z}, y={y}, x={x}]; the server refuses them: "
                     "replace them first, e.g. numpy.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)")


def segment_volume(client, volume, *, chunks: ChunkSettings = ChunkSettings(), inflight: int = 2,
                   retries: int | None = None, patience_s: float = DEFAULT_PATIENCE_S,
                   progress: ProgressCallback | None = None, **options):
    """Segment ``volume`` (``[D, H, W]`` or ``[C, D, H, W]``, numpy) in chunks when it is larger
    than ``chunks`` allows, else in one request; either way a request that fails for a passing
    reason is retried (``retries``, ``patience_s``: as ``segment_stream``). Returns a
    ``SegmentationResult`` whose ``chunks`` says how many requests it took.

    Raises:
        ValueError: a float volume holding NaN or Inf.
        ChunkingError: chunk settings that cannot give exact seams.
        SegmentationError: a chunk failed after its retries (named by its voxel range).
    """
    check_volume_settings(chunks, inflight, retries, progress)
    info = client.network_info()
    image = as_channel_first(np.asarray(volume), info.spatial_dims)
    check_finite(image)
    spatial_shape = tuple(image.shape[1:])
    overlap = effective_overlap(options.get("overlap"))
    plan = plan_chunks(spatial_shape, info.tile, overlap, chunks.shape, chunks.max_voxels, chunks.min_shared)
    stream_settings = {"inflight": min(inflight, len(plan)), "retries": retries, "patience_s": patience_s}
    if progress:
        progress(0, len(plan))
    if len(plan) == 1:  # the server does it all: the intensity range, keep_largest, the contour
        whole: list[SegmentationResult] = []
        send_chunks(client, image, plan, options, stream_settings, lambda _, result: whole.append(result), progress)
        return whole[0]
    sent, after = chunked_request_options(image, options)
    outputs = allocate_outputs(spatial_shape, info.num_classes, options)
    send_chunks(client, image, plan, sent, stream_settings, lambda chunk, result: store_chunk(outputs, chunk, result),
                progress)
    finish_whole_volume(outputs, info.num_classes, after)
    return SegmentationResult(outputs["mask"], outputs.get("probabilities"), outputs.get("contour"), chunks=len(plan))
