"""Datasets larger than one machine on a Dask cluster: tasks, their plan, and what each worker runs.

A stack of 2D frames ``[N, H, W]`` (``[N, C, H, W]``) is cut into tasks of ``frames_per_task``
frames; a 3D volume ``[D, H, W]`` (``[C, D, H, W]``) into blocks. Every task owns exactly one
chunk of each output array (the output's chunk shape *is* the task's extent), so no two tasks
ever write the same zarr chunk: zarr has no write locks and a shared chunk would lose data.

A volume block ``[a, b)`` along an axis is sent with a halo: from the start of the first of the
server's sliding windows (MONAI's grid, ``client.chunks.window_starts``) that touches ``a`` to
the end of the last one that touches ``b - 1``. The server, sliding over that region alone,
places exactly the whole volume's windows there, so every voxel of the block is blended from
the same windows in the same order as in one whole-volume request: stitched blocks equal it
bit for bit (the property ``client.chunks`` has, on a regular grid of any block size).

A task writes its data, then its element of the ``done`` array (one chunk per task): written
by the task itself after its data, never read-modify-written by anyone else, and not
confused with "chunk exists" (zarr skips chunks equal to the fill value). ``--resume`` runs
only tasks whose element is 0; a rerun writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time

import numpy as np

from client import dataset_outages
from client.chunks import DEFAULT_OVERLAP, Chunk, window_starts
from client.dataset_sources import DatasetSource
from client.stacks import FAILED_VALUE, OUTPUT_DTYPES

LOCAL_URL_ENV = "SEGSERVE_LOCAL_URL"  # a worker's own node server, tried before the URL list
DONE_ARRAY = "done"


@dataclasses.dataclass(frozen=True)
class Task(Chunk):
    """One unit of work: ``kept`` (output coordinates, spatial axes) is written; ``sent``
    (spatial axes) is read and sent. For stacks the first axis counts frames and both agree."""

    def describe(self) -> str:
        return "[" + ", ".join(f"{s.start}:{s.stop}" for s in self.kept) + "]"


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker needs besides its task (small and picklable)."""

    source: DatasetSource
    output: str
    layout: str  # stack | volume
    channels: bool  # the input has a channel axis after the frame axis (stacks) or first (volumes)
    urls: tuple[str, ...]
    model: str
    network: str | None
    transport: str
    token: str | None  # --token as given; None: each worker's own $SEGSERVE_TOKEN or token file
    timeout_s: float | None
    retries: int | None  # None: as many as patience_s allows
    patience_s: float  # seconds the servers may keep failing (the worker's client's outage) before items give up
    inflight: int
    options: dict  # request options, the same for every task
    outputs: tuple[str, ...]  # mask, probabilities, contour
    run: str | None = None  # the run's id, under which workers report outages (None: they do not)


@dataclasses.dataclass
class TaskReport:
    """What one task did: counts for the summary and the per-task cost figures."""

    index: int
    items: int  # frames or blocks segmented
    seconds: float
    bytes_read: int
    bytes_written: int
    retried: int  # items that took more than one attempt
    servers: dict[str, int]
    error: str | None = None  # an item the server refused (bad pixels): the task is not done
    outage: dict | None = None  # its process's outage state at its end (``client.dataset_outages.state``)


def plan_stack(frames: int, frames_per_task: int) -> list[Task]:
    """Tasks of ``frames_per_task`` consecutive frames (the last one may be shorter)."""
    if frames_per_task < 1:
        raise ValueError(f"frames per task must be >= 1, got {frames_per_task}")
    return [Task(i, (slice(a, min(a + frames_per_task, frames)),), (slice(a, min(a + frames_per_task, frames)),))
            for i, a in enumerate(range(0, frames, frames_per_task))]


def axis_halo(length: int, tile: int, overlap: float, start: int, stop: int) -> tuple[int, int]:
    """The region ``[first window start, last window end)`` covering every window of the whole
    axis that touches ``[start, stop)``."""
    starts = window_starts(length, tile, overlap)
    touching = [s for s in starts if s < stop and s + min(tile, length) > start]
    return min(touching), max(s + min(tile, length) for s in touching)


def axis_spans(length: int, tile: int, overlap: float, extent: int) -> list[tuple[slice, slice]]:
    """(sent, kept) of each block of ``extent`` voxels along one axis: kept ``[a, b)``, sent
    with the halo ``axis_halo`` gives it."""
    spans = []
    for start in range(0, length, extent):
        stop = min(start + extent, length)
        spans.append((slice(*axis_halo(length, tile, overlap, start, stop)), slice(start, stop)))
    return spans


def plan_volume(shape: tuple[int, ...], tile: tuple[int, ...], block: tuple[int, ...],
                overlap: float = DEFAULT_OVERLAP) -> list[Task]:
    """Blocks of ``block`` voxels (the last ones along an axis shorter) with their halos.

    Raises:
        ValueError: a block extent < 1 or a rank that differs from the tile's.
    """
    if not len(shape) == len(tile) == len(block):
        raise ValueError(f"volume {list(shape)}, tile {list(tile)} and block {list(block)} differ in rank")
    if any(b < 1 for b in block):
        raise ValueError(f"block extents must be >= 1, got {list(block)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    per_axis = [axis_spans(length, size, overlap, extent) for length, size, extent in zip(shape, tile, block)]
    return [Task(i, tuple(s for s, _ in combo), tuple(k for _, k in combo))
            for i, combo in enumerate(itertools.product(*per_axis))]


def largest_request(shape: tuple[int, ...], tile: tuple[int, ...], block: tuple[int, ...], overlap: float) -> int:
    """Voxels of the largest region a task sends with blocks of ``block`` (its block and halos)."""
    return math.prod(max(sent.stop - sent.start for sent, _ in axis_spans(n, t, overlap, b))
                     for n, t, b in zip(shape, tile, block))


def default_block(shape: tuple[int, ...], tile: tuple[int, ...], max_voxels: int,
                  overlap: float = DEFAULT_OVERLAP) -> tuple[int, ...]:
    """The tile's shape times the largest power of two (each extent cut to the volume) whose
    largest request (block and halos, ``largest_request``) stays within ``max_voxels``.
    Blocks keep the tile's proportions, so a flat tile gets flat blocks.

    Raises:
        ValueError: even blocks of one tile send more than ``max_voxels``.
    """
    def blocks(scale: int) -> tuple[int, ...]:
        return tuple(min(size * scale, n) for size, n in zip(tile, shape))

    scale = 1
    smallest = largest_request(shape, tile, blocks(scale), overlap)
    if smallest > max_voxels:
        raise ValueError(f"--max-chunk-voxels {max_voxels} is below the smallest request blocks can make here "
                         f"({smallest} voxels: blocks of {list(blocks(scale))} with their halos); raise it or give --block")
    while blocks(scale) != tuple(shape) and largest_request(shape, tile, blocks(scale * 2), overlap) <= max_voxels:
        scale *= 2
    return blocks(scale)


# --- what a worker runs -------------------------------------------------------------------------

_CLIENTS: dict[tuple, object] = {}  # per worker process: (process id, settings) -> SegmentationClient


def worker_clients(job: Job) -> list:
    """This process's clients, made on first use and kept for its lifetime: the node's own
    server (``$SEGSERVE_LOCAL_URL``) first when set, then the job's URL list (which fails over
    between its servers). Made lazily in the worker: gRPC channels do not survive a fork."""
    from client.api import SegmentationClient

    local = os.environ.get(LOCAL_URL_ENV, "").strip()
    choices = ([(local,)] if local else []) + ([job.urls] if job.urls != (local,) else [])
    clients = []
    for urls in choices:
        # The process id: a process forked from this one inherits the dict, and a client is
        # refused in a process forked from the one that made it.
        key = (os.getpid(), urls, job.model, job.network, job.transport, job.token, job.timeout_s)
        if key not in _CLIENTS:
            _CLIENTS[key] = SegmentationClient(list(urls), transport=job.transport, model=job.model, network=job.network,
                                               timeout_s=job.timeout_s, token=job.token)
        clients.append(_CLIENTS[key])
    return clients


def answered_counts(clients) -> dict[str, int]:
    return {s.url: s.answered for c in clients for s in c.servers.servers}


def segment_items(job: Job, items: list[tuple[int, np.ndarray]]) -> tuple[dict[int, object], int, dict[int, str]]:
    """Results of ``items`` (index, image) on the first client that answers them all (a
    client whose servers all fail hands the rest to the next: the URL list), how many items
    took more than one attempt, and the errors of the items the URL list's servers refused
    (NaN pixels: a rerun would fail alike), by index. What the node's own server fails, for
    any reason (it may lack the network), goes to the URL list.

    Raises:
        SegmentationError: an item failed for a passing reason on every client after its retries.
    """
    from client.connection import SegmentationError

    results, retried, refused, clients = {}, set(), {}, worker_clients(job)
    for position, client in enumerate(clients):
        last = position == len(clients) - 1
        todo = [(i, lambda image=image: image) for i, image in items if i not in results]
        # The node's own server, when the URL list follows it, hands over at its first failure:
        # the list's patience, not a wait on one server, rides out a restart.
        patience = dict(retries=job.retries, patience_s=job.patience_s) if last else dict(retries=0, patience_s=0.0)
        try:
            for outcome in client.segment_stream(todo, inflight=job.inflight, **patience, **job.options):
                if outcome.attempts > 1:
                    retried.add(outcome.index)
                if outcome.ok:
                    results[outcome.index] = outcome.result
                elif last and not outcome.retryable:
                    refused[outcome.index] = outcome.error
                elif last:
                    raise SegmentationError(f"item {outcome.index} failed: {outcome.error}", retryable=True)
        except SegmentationError as error:
            if last or not error.retryable:
                raise
            continue  # e.g. its server is down: its first question failed
        if len(results) == len(items):
            break
    return results, len(retried), refused


def failed_fill(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """What an output holds where its item failed, as ``segment`` writes a failed frame:
    ``FAILED_VALUE`` (never a class) in a mask or contour, NaN in probabilities; the fill
    value, 0, is a class, and a region left at it read as background."""
    return np.full(shape, np.nan if name == "probabilities" else FAILED_VALUE, dtype=OUTPUT_DTYPES[name])


def run_task(job: Job, task: Task) -> TaskReport:
    """Read the task's input, segment it, write its chunk of every output, then mark it done.
    Raises on a passing failure (Dask reruns the task; its chunk is then rewritten whole); an
    item the server refused is reported in ``error``, not raised (a rerun would fail alike):
    the task's other items are written, the refused ones filled (``failed_fill``), and the
    task is left not done, for ``--resume`` once the input is mended."""
    from client.connection import SegmentationError

    start = time.perf_counter()
    try:
        # Reported while it runs: the outage of the URL list's client (the last), which the patience is measured on.
        with dataset_outages.running(job.run, worker_clients(job)[-1].outage) as outage_state:
            report = write_task(job, task, start)
            report.outage = outage_state()
            return report
    except SegmentationError as error:
        if error.retryable:
            raise
        return TaskReport(task.index, 0, time.perf_counter() - start, 0, 0, 0, {}, error=str(error))


def write_task(job: Job, task: Task, start: float) -> TaskReport:
    """``run_task``'s work."""
    import zarr

    clients = worker_clients(job)
    before = answered_counts(clients)
    group = zarr.open_group(job.output, mode="r+")
    if job.layout == "stack":
        image = job.source.read(task.sent)
        items = list(enumerate(image, start=task.sent[0].start))
        results, retried, refused = segment_items(job, items)
        outputs = {name: np.stack([getattr(results[i], name) if i in results else failed_fill(name, group[name].shape[1:])
                                   for i, _ in items]) for name in job.outputs}
        what_failed = f"frame(s) {', '.join(str(i) for i in sorted(refused))}"
    else:
        region = ((slice(None),) if job.channels else ()) + task.sent
        image = job.source.read(region)
        results, retried, refused = segment_items(job, [(task.index, image)])
        outputs = volume_outputs(job, task, results.get(task.index), group)
        what_failed = "its block"
    segmented = len(results) if job.layout == "stack" else int(bool(results))
    written = 0
    for name, data in outputs.items():
        target = task.kept if name != "probabilities" or job.layout == "stack" else (slice(None), *task.kept)
        group[name][target] = data
        written += data.nbytes
    error = None
    if refused:
        error = (f"{what_failed} refused by the server, written as {FAILED_VALUE} in the mask; mend the input and "
                 f"--resume: {next(iter(refused.values()))}")
    else:
        group[DONE_ARRAY][task.index] = 1  # after the data: a task marked done is on disk
    after = answered_counts(clients)
    return TaskReport(task.index, segmented, time.perf_counter() - start, int(image.nbytes), written, retried,
                      {u: after[u] - before.get(u, 0) for u in after}, error=error)


def volume_outputs(job: Job, task: Task, result, group) -> dict[str, np.ndarray]:
    """A volume block's kept part of each output: of ``result``, or ``failed_fill`` when the
    server refused the block (``result`` None)."""
    inner = task.sent_kept
    kept_shape = tuple(s.stop - s.start for s in task.kept)
    outputs = {}
    for name in job.outputs:
        if result is None:
            shape = (group[name].shape[0], *kept_shape) if name == "probabilities" else kept_shape
            outputs[name] = failed_fill(name, shape)
        elif name == "probabilities":
            outputs[name] = result.probabilities[(slice(None), *inner)]
        else:  # contour: with one block covering the volume only (a whole-volume request)
            outputs[name] = getattr(result, name)[inner]
    return outputs
