"""The pipeline's own metrics on Triton's metrics endpoint (``:8002/metrics``), next to Triton's
``nv_*`` families, through the Python backend's custom metrics (``pb_utils.MetricFamily``;
histograms since Triton 2.51).

Families (``step`` is the Triton model of the step: ``segment_2d``, ``segment_3d``,
``unet2d_particles``, ...; ``pipeline`` is ``segment_2d`` or ``segment_3d``, after the frame's
spatial dims, so ``segment_2d_uint16`` counts as ``segment_2d``):

- ``segserve_frames_total{pipeline,dtype}`` counter: frames (2D) or volumes (3D) the pipeline
  accepted (validated and normalized), by the pixel type they arrived in.
- ``segserve_pixels_total{pipeline,dtype}`` counter: their pixels (voxels) per channel.
- ``segserve_tiles_per_frame{pipeline}`` histogram: network tiles one frame needed.
- ``segserve_bls_calls_per_frame{pipeline}`` histogram: BLS requests to the network per frame.
- ``segserve_network_batch_tiles{network}`` histogram: tiles per network execution, after
  Triton's dynamic batcher merged the BLS requests (what the GPU sees).
- ``segserve_step_seconds{step}`` histogram: wall time of one request in a step (for the
  network: one batched execution).
- ``segserve_refused_requests_total{step,reason}`` counter: requests answered with an error;
  ``reason`` is the error's class (``input_error``, ``option_error``, ``network_config_error``,
  ``network_call_error``, ``out_of_memory_error``, ...).

Cost: each update is one message from the stub to the server process (a round trip, about
0.5 ms on a busy 2-core machine), so updates are per request or per network batch, never per
tile or pixel (seven per 2D frame, plus two per network batch). A reporter thread sends them:
the step only queues an update, and the messages go while the step goes on or waits for its
next request (the two per network batch were ~4% of a 2048² frame on the critical path,
measured with py-spy). The metrics endpoint shows an update a moment after the response. Outside Triton, or
where the backend has no custom metrics, every method does nothing.

Use in a Python-backend model::

    from segserve.metrics import METRICS
    METRICS.bind(args["model_name"])                                   # initialize
    return [METRICS.timed(self._execute_one, r) for r in requests]     # execute
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from segproto import PIPELINES

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside the Triton stub: metrics are a no-op
    pb_utils = None

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 300.0)
TILES_PER_FRAME_BUCKETS = tuple(float(2**k) for k in range(17))  # 1 .. 65536
BLS_CALLS_PER_FRAME_BUCKETS = tuple(float(2**k) for k in range(13))  # 1 .. 4096
BATCH_TILES_BUCKETS = tuple(float(2**k) for k in range(11))  # 1 .. 1024

# name -> (kind, help, label names, histogram buckets or None). The help text must be the same
# in every stub: Triton merges families of one name only when they agree.
FAMILIES = {
    "segserve_frames_total": ("COUNTER", "Frames (2D) or volumes (3D) accepted by the pipeline, by pixel type",
                              ("pipeline", "dtype"), None),
    "segserve_pixels_total": ("COUNTER", "Pixels (voxels) per channel of the accepted frames, by pixel type",
                              ("pipeline", "dtype"), None),
    "segserve_tiles_per_frame": ("HISTOGRAM", "Network tiles of one frame", ("pipeline",), TILES_PER_FRAME_BUCKETS),
    "segserve_bls_calls_per_frame": ("HISTOGRAM", "BLS requests to the network for one frame", ("pipeline",),
                                     BLS_CALLS_PER_FRAME_BUCKETS),
    "segserve_network_batch_tiles": ("HISTOGRAM", "Tiles per network execution after dynamic batching", ("network",),
                                     BATCH_TILES_BUCKETS),
    "segserve_step_seconds": ("HISTOGRAM", "Seconds of one request in a pipeline step (network: one batched execution)",
                              ("step",), STEP_SECONDS_BUCKETS),
    "segserve_refused_requests_total": ("COUNTER", "Requests answered with an error, by step and error class",
                                        ("step", "reason"), None),
}


def pipeline_of(spatial_dims: int) -> str:
    return PIPELINES[spatial_dims]


def dtype_name(tensor: Any) -> str:
    """``uint16`` for a torch.uint16 or numpy uint16 tensor."""
    return str(tensor.dtype).removeprefix("torch.")


def refusal_reason(error: BaseException) -> str:
    """The error's class in snake case: ``InputError`` -> ``input_error`` (a bounded label set)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


class PipelineMetrics:
    """The families above in one stub process (each Triton model instance is a process).

    ``bind`` names the step (the model) once; the other methods record. Every method is safe
    to call before ``bind``, outside Triton, or where custom metrics are missing: it does
    nothing. Metric objects are made once per label set and kept (making one is a round trip).
    """

    def __init__(self, metric_api: Any = pb_utils):
        self.step = "unknown"
        self._api = metric_api
        self._families: dict[str, Any] | None = None
        self._metrics: dict[tuple, Any] = {}
        self._frame_tiles = 0
        self._frame_calls = 0
        self._frame_pipeline: str | None = None
        # (operation, family, value, label values), sent by the reporter thread; None stops it.
        self._updates: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._reporter: threading.Thread | None = None

    def bind(self, model_name: str) -> None:
        """Record under ``step=model_name`` from now on, and register the families."""
        self.step = model_name
        self._families = self._register()

    def _register(self) -> dict[str, Any] | None:
        if self._api is None or not hasattr(self._api, "MetricFamily"):
            return None
        try:
            return {name: self._api.MetricFamily(name=name, description=help_text, kind=getattr(self._api.MetricFamily, kind))
                    for name, (kind, help_text, _, _) in FAMILIES.items()}
        except Exception as error:  # noqa: BLE001 - metrics never stop the pipeline
            self._api.Logger.log_warn(f"{self.step}: pipeline metrics disabled: {error}")
            return None

    def _metric(self, name: str, *label_values: str):
        key = (name, *label_values)
        metric = self._metrics.get(key)
        if metric is None:
            _, _, label_names, buckets = FAMILIES[name]
            labels = dict(zip(label_names, label_values))
            options = {"buckets": list(buckets)} if buckets is not None else {}
            metric = self._metrics[key] = self._families[name].Metric(labels=labels, **options)
        return metric

    def _add(self, name: str, value: float, *label_values: str) -> None:
        self._update("increment", name, value, label_values)

    def _observe(self, name: str, value: float, *label_values: str) -> None:
        self._update("observe", name, value, label_values)

    def _update(self, operation: str, name: str, value: float, label_values: tuple[str, ...]) -> None:
        if self._families is None:
            return
        if self._reporter is None:
            self._reporter = threading.Thread(target=self._report, name="segserve-metrics", daemon=True)
            self._reporter.start()
        self._updates.put((operation, name, value, label_values))

    def _report(self) -> None:
        """The reporter thread: sends queued updates in order until ``close``."""
        while (update := self._updates.get()) is not None:
            operation, name, value, label_values = update
            if self._families is None:
                continue
            try:
                getattr(self._metric(name, *label_values), operation)(value)
            except Exception as error:  # noqa: BLE001 - metrics never fail a request
                self._families = None
                self._api.Logger.log_warn(f"{self.step}: pipeline metrics disabled after an error: {error}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then stop the reporter (a model's ``finalize``: the stub's
        shared memory goes away after it)."""
        if self._reporter is not None:
            self._updates.put(None)
            self._reporter.join(timeout_s)
            self._reporter = None

    # What the steps call.

    def frame_accepted(self, frame: Any) -> None:
        """A frame ``[C, *spatial]`` (torch or numpy, its wire dtype) entered the pipeline."""
        spatial = frame.shape[1:]
        pixels = 1
        for size in spatial:
            pixels *= int(size)
        pipeline, dtype = pipeline_of(len(spatial)), dtype_name(frame)
        self._add("segserve_frames_total", 1, pipeline, dtype)
        self._add("segserve_pixels_total", pixels, pipeline, dtype)

    def tile_batch(self, tiles: int, bls_calls: int, spatial_dims: int) -> None:
        """The current frame sent ``tiles`` tiles in ``bls_calls`` BLS requests (no IPC here:
        summed per frame and recorded when ``timed`` ends)."""
        self._frame_tiles += tiles
        self._frame_calls += bls_calls
        self._frame_pipeline = pipeline_of(spatial_dims)

    def refused(self, error: BaseException) -> None:
        """This step answered a request with ``error``."""
        self._add("segserve_refused_requests_total", 1, self.step, refusal_reason(error))

    def step_seconds(self, seconds: float) -> None:
        self._observe("segserve_step_seconds", seconds, self.step)

    def timed(self, execute_one: Callable, request: Any):
        """``execute_one(request)``, recording its seconds and the frame's tiles and BLS calls."""
        self._frame_tiles = self._frame_calls = 0
        started = time.perf_counter()
        try:
            return execute_one(request)
        finally:
            self.step_seconds(time.perf_counter() - started)
            if self._frame_calls:
                self._observe("segserve_tiles_per_frame", self._frame_tiles, self._frame_pipeline)
                self._observe("segserve_bls_calls_per_frame", self._frame_calls, self._frame_pipeline)

    def network_call(self, network: Callable, tiles: Any):
        """``network(tiles)`` for a ``[B, C, *tile]`` batch, recording B and the seconds (GPU
        work included: the response needs the logits finished anyway)."""
        started = time.perf_counter()
        logits = network(tiles)
        if getattr(logits, "is_cuda", False):
            import torch

            torch.cuda.current_stream(logits.device).synchronize()
        self.step_seconds(time.perf_counter() - started)
        self._observe("segserve_network_batch_tiles", int(tiles.shape[0]), self.step)
        return logits


# One per stub process: the step models import it and ``bind`` it in ``initialize``.
METRICS = PipelineMetrics()
