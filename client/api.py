"""Python API of the segmentation service.

    from client import SegmentationClient
    with SegmentationClient() as seg:                       # gRPC to 127.0.0.1:8001
        result = seg.segment(frame)                          # frame: [H, W] or [C, H, W]
        result.mask                                          # [H, W] uint8 class per pixel
        seg.segment(frame, probabilities=True).probabilities # [K, H, W] float32

    with SegmentationClient(transport="shm") as seg:        # frames through /dev/shm
        for outcome in seg.segment_stream(frames, inflight=4):
            outcome.index, outcome.result.mask, outcome.error

Transports: ``grpc`` (default), ``http``, ``shm`` (system shared memory, same host) and
``cuda-shm`` (CUDA shared memory; also takes torch/CuPy tensors already on the GPU without a
host copy). Shared-memory regions are made once per in-flight slot, reused for every frame,
and unregistered and freed by ``close()`` (the ``with`` block); regions left by a crashed
client are removed when the next shared-memory client starts.
"""

from __future__ import annotations

import atexit
import dataclasses
import queue
from collections.abc import Iterable, Iterator

import numpy as np

from client.auth import resolve_token, token_headers
from client.connection import DEFAULT_URLS, Connection, SegmentationError
from client.shared_memory import SHM_KINDS, remove_stale_regions
from client.stream import Outcome, RetryPolicy, ordered_stream
from client.transports import (INPUT_BY_DTYPE, TRANSPORTS, InlineTransport, SharedMemoryTransport, frame_dtype,
                               on_gpu, output_specs)

LOSSLESS_TO_FLOAT32 = (np.dtype(np.float16), np.dtype(np.float64), np.dtype(np.int8), np.dtype(bool))
PIPELINE_STEP_WITH_DEFAULT_NETWORK = "sliding_window_2d"
CONTROL_TIMEOUT_S = 30.0

__all__ = ["SegmentationClient", "SegmentationError", "SegmentationResult", "SegmentOptions", "Outcome",
           "RetryPolicy", "as_channel_first", "TRANSPORTS"]


@dataclasses.dataclass
class SegmentationResult:
    """One frame's outputs: mask ``[H, W]`` uint8; probabilities ``[K, H, W]`` float32 and
    contour ``[H, W]`` uint8 when asked for, else None."""

    mask: np.ndarray
    probabilities: np.ndarray | None = None
    contour: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """What to compute for each frame. None leaves the server's default (the server checks
    every value and names the bad one in its error)."""

    probabilities: bool = False
    contour: bool = False
    keep_largest: bool | None = None
    overlap: float | None = None
    blend: str | None = None
    sw_batch_size: int | None = None
    intensity_min: float | None = None
    intensity_max: float | None = None

    def parameters(self, network: str | None) -> dict:
        """Request parameters: options left as None are not sent."""
        parameters = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                      if getattr(self, f.name) is not None and getattr(self, f.name) is not False}
        if network is not None:
            parameters["network"] = network
        return parameters


def as_channel_first(frame):
    """``[H, W]`` -> ``[1, H, W]``; ``[C, H, W]`` unchanged; float64/float16/int8/bool numpy
    frames -> float32 (the network computes in float32 anyway). GPU tensors keep their device.

    Raises:
        ValueError: unsupported rank or pixel type.
    """
    if not on_gpu(frame) and not isinstance(frame, np.ndarray):
        frame = np.asarray(frame)
    if isinstance(frame, np.ndarray) and frame.dtype in LOSSLESS_TO_FLOAT32:
        frame = frame.astype(np.float32)
    if frame.ndim == 2:
        frame = frame[None]
    if frame.ndim != 3:
        raise ValueError(f"frame must be [H, W] or [C, H, W], got shape {list(frame.shape)}")
    dtype = frame_dtype(frame)
    if dtype not in INPUT_BY_DTYPE:
        supported = ", ".join(str(d) for d in INPUT_BY_DTYPE)
        raise ValueError(f"pixel type {dtype} is not supported; use one of {supported}")
    if isinstance(frame, np.ndarray):
        return np.ascontiguousarray(frame)
    if hasattr(frame, "contiguous"):  # torch
        return frame.contiguous()
    return frame if frame.flags.c_contiguous else frame.copy(order="C")  # CuPy


class SegmentationClient:
    """Client of the ``segment_2d`` ensemble over one transport.

    Args:
        url: ``host:port`` (default 127.0.0.1:8001 for gRPC and shared memory, :8000 for HTTP).
        transport: ``grpc``, ``http``, ``shm`` or ``cuda-shm``.
        model: ensemble to call.
        network: network model to use (None: the server's default).
        timeout_s: per-request deadline in seconds (None: no deadline).
        headers: extra headers sent with every call.
        token: token of the server's restricted endpoints (shared-memory registration, model
            configuration); default ``$SEGSERVE_TOKEN`` or the token file the server wrote
            (``client.auth``). Inference itself needs none.
        device_id: GPU of CUDA shared-memory regions.
    """

    def __init__(self, url: str | None = None, *, transport: str = "grpc", model: str = "segment_2d",
                 network: str | None = None, timeout_s: float | None = None,
                 headers: dict[str, str] | None = None, token: str | None = None, device_id: int = 0):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.transport, self.model, self.network = transport, model, network
        self.protocol = "http" if transport == "http" else "grpc"
        self.url = url or DEFAULT_URLS[self.protocol]
        self.timeout_s, self.device_id = timeout_s, device_id
        self.headers = {**(headers or {}), **token_headers(resolve_token(token), self.protocol)}
        # Control calls (readiness, configuration, region cleanup) get their own fixed deadline:
        # a short per-frame timeout must not make a busy server look absent.
        self._control = Connection(self.url, self.protocol, self.headers, CONTROL_TIMEOUT_S)
        self._transports: list = []
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._network_shape: tuple[int, int] | None = None
        self.stale_regions_removed: list[str] = []
        if transport in SHM_KINDS:
            try:
                self.stale_regions_removed = remove_stale_regions(self._control, SHM_KINDS[transport])
            except SegmentationError:
                self._control.close()
                raise
        atexit.register(self.close)  # regions are freed even if the caller forgets close()

    def _connect(self) -> Connection:
        return Connection(self.url, self.protocol, self.headers, self.timeout_s)

    def _new_transport(self):
        connection = self._connect()
        if self.transport in SHM_KINDS:
            return SharedMemoryTransport(connection, SHM_KINDS[self.transport], self.device_id)
        return InlineTransport(connection)

    def _slot(self, slot: int):
        while len(self._transports) <= slot:
            self._transports.append(self._new_transport())
        return self._transports[slot]

    @property
    def regions_created(self) -> int:
        """Shared-memory regions created so far (reuse keeps this at slots x outputs)."""
        return sum(t.regions.created for t in self._transports if isinstance(t, SharedMemoryTransport))

    def close(self) -> None:
        """Unregister and free every shared-memory region; close the connections. Idempotent."""
        atexit.unregister(self.close)
        errors = []
        for transport in self._transports:
            try:
                transport.close()
            except SegmentationError as error:
                errors.append(str(error))
        self._transports.clear()
        self._idle = queue.LifoQueue()
        self._control.close()
        if errors:
            raise SegmentationError(f"cleanup incomplete: {'; '.join(errors)}")

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def is_ready(self) -> bool:
        return self._control.is_model_ready(self.model)

    def network_shape(self) -> tuple[int, int]:
        """``(in_channels, num_classes)`` of the network this client's requests run."""
        if self._network_shape is None:
            network = self.network
            if network is None:
                config = self._control.model_config(PIPELINE_STEP_WITH_DEFAULT_NETWORK)
                network = config["parameters"]["default_network"]["string_value"]
            metadata = self._control.model_metadata(network)
            self._network_shape = (int(metadata["inputs"][0]["shape"][1]), int(metadata["outputs"][0]["shape"][1]))
        return self._network_shape

    def _segment_on(self, transport, image, options: SegmentOptions) -> SegmentationResult:
        num_classes = self.network_shape()[1] if options.probabilities else None
        specs = output_specs(tuple(image.shape[1:]), options.probabilities, options.contour, num_classes)
        outputs = transport.infer(self.model, image, specs, options.parameters(self.network))
        return SegmentationResult(outputs["MASK"], outputs.get("PROBABILITIES"), outputs.get("CONTOUR"))

    def segment(self, frame, **options) -> SegmentationResult:
        """Segment one frame ``[H, W]`` or ``[C, H, W]`` (float32, uint8, uint16 or int16;
        numpy, or a torch/CuPy tensor). Keyword options: see ``SegmentOptions``.

        Raises:
            ValueError: unsupported pixel type or rank (checked before sending).
            SegmentationError: the server's error, e.g. a bad option value.
        """
        image = as_channel_first(frame)
        settings = SegmentOptions(**options)
        try:
            transport = self._idle.get_nowait()
        except queue.Empty:
            transport = self._slot(len(self._transports))
        try:
            return self._segment_on(transport, image, settings)
        finally:
            self._idle.put(transport)

    def segment_stream(self, frames: Iterable, *, inflight: int = 4, retries: int = 3, backoff_s: float = 0.5,
                       **options) -> Iterator[Outcome]:
        """Segment many frames with ``inflight`` requests at once; yields one ``Outcome`` per
        frame in input order (``outcome.result`` a SegmentationResult, or ``outcome.error``).

        Args:
            frames: arrays, or ``(index, load)`` pairs where ``load()`` returns the frame
                (lets a reader stream from disk; a load error fails only that frame).
            inflight: requests in flight (one connection and set of regions each).
            retries: further attempts for a frame that failed for a retryable reason
                (server busy or restarting, connection lost, deadline passed).
            backoff_s: wait before the first retry; doubles each time.
        """
        settings = SegmentOptions(**options)
        policy = RetryPolicy(retries=retries, backoff_s=backoff_s)
        slots = [self._slot(w) for w in range(inflight)] if inflight >= 1 else []

        def process(worker: int, frame):
            return self._segment_on(slots[worker], as_channel_first(frame), settings)

        yield from ordered_stream(_as_items(frames), process, inflight, policy)


def _as_items(frames: Iterable) -> Iterator[tuple[int, object]]:
    for index, frame in enumerate(frames):
        if isinstance(frame, tuple) and len(frame) == 2 and callable(frame[1]):
            yield frame
        else:
            yield index, (lambda f=frame: f)
