"""Python API of the segmentation service.

    from client import SegmentationClient
    with SegmentationClient() as seg:                       # gRPC to 127.0.0.1:8001
        result = seg.segment(frame)                          # frame: [H, W] or [C, H, W]
        result.mask                                          # [H, W] uint8 class per pixel
        seg.segment(frame, probabilities=True).probabilities # [K, H, W] float32

    with SegmentationClient(transport="shm") as seg:        # frames through /dev/shm
        for outcome in seg.segment_stream(frames, inflight=4):
            if outcome.ok: outcome.index, outcome.result.mask   # else outcome.error: one line

    with SegmentationClient(model="segment_3d") as seg:     # volumes [D, H, W] of any size:
        seg.segment_volume(volume, inflight=2).mask          # chunked beyond 512x512x256 voxels

Transports: ``grpc`` (default), ``http``, ``shm`` (system shared memory, same host) and
``cuda-shm`` (CUDA shared memory; also takes torch/CuPy tensors already on the GPU without a
host copy). Shared-memory regions are made once per in-flight slot, reused for every frame,
and unregistered and freed by ``close()`` (the ``with`` block); regions left by a crashed
client are removed when the next shared-memory client starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import queue
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from client.auth import resolve_token, token_headers
from client.connection import DEFAULT_URLS, Connection, SegmentationError
from client.servers import DEFAULT_COOLDOWN_S, ServerPool, split_urls
from client.shared_memory import SHM_KINDS, check_cuda, remove_stale_regions
from client.stream import (DEFAULT_PATIENCE_S, STOP_GRACE_S, Outage, Outcome, RetryPolicy, call_with_retries,
                           check_inflight, ordered_stream, wait_for_recovery)
from client.volumes import ChunkSettings, segment_volume
from client.results import NetworkInfo, SegmentationResult
from client.transports import (TRANSPORTS, VOLUME_HINT, InlineTransport, SharedMemoryTransport, as_channel_first,
                               output_specs)
from segproto import DEFAULT_NETWORK_PARAMETER, TRITON_RESTRICTED_PHRASE, looks_channels_last

T = TypeVar("T")

CONTROL_TIMEOUT_S = 30.0

__all__ = ["SegmentationClient", "SegmentationError", "SegmentationResult", "SegmentOptions", "NetworkInfo", "ChunkSettings",
           "Outcome", "RetryPolicy", "as_channel_first", "TRANSPORTS"]


CLIENT_SETTINGS = ("network", "model", "transport", "url", "token", "timeout_s")


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

    @classmethod
    def of(cls, **options) -> SegmentOptions:
        """The options of a call (``segment(frame, overlap=0.5)``); a name that is no option is
        refused naming the options, or where it goes (the network and model are the client's)."""
        names = [field.name for field in dataclasses.fields(cls)]
        for name in options:
            if name in CLIENT_SETTINGS:
                raise TypeError(f"{name} is chosen per client, not per call: SegmentationClient(url, {name}=...)")
            if name not in names:
                raise TypeError(f"unknown option {name!r}; the options are {', '.join(names)}")
        return cls(**options)

    def __post_init__(self):
        """Each value as the Python type it is sent as (numpy scalars such as ``frame.min()``
        are converted: tritonclient refuses them), or a ValueError naming the option."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                object.__setattr__(self, field.name, _as_option_type(field.name, value))

    def parameters(self, network: str | None) -> dict:
        """Request parameters: options left as None are not sent."""
        parameters = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                      if getattr(self, f.name) is not None and getattr(self, f.name) is not False}
        if network is not None:
            parameters["network"] = network
        return parameters


_BOOLEAN_OPTIONS = ("probabilities", "contour", "keep_largest")
_INTEGER_OPTIONS = ("sw_batch_size",)
_TEXT_OPTIONS = ("blend",)


def _as_option_type(name: str, value):
    """``value`` of option ``name`` as a bool, int, float or str (numpy scalars included)."""
    if name in _BOOLEAN_OPTIONS:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{name} must be True or False, got {value!r}")
    if name in _TEXT_OPTIONS:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be a string, got {value!r}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if name in _INTEGER_OPTIONS:
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def release_slots_and_controls(slots: list[dict], lock: threading.Lock, controls: list[Connection],
                               owner_pid: int) -> list[str]:
    """Close every slot's transports (their shared-memory regions unregistered and freed) and
    the control connections; the errors of those that could not be closed. Nothing in a
    process forked from ``owner_pid``: its copies of them are the parent's, still in use there."""
    if os.getpid() != owner_pid:
        return []
    with lock:
        transports = [transport for slot in slots for transport in slot.values()]
        slots.clear()
    errors = close_transports(transports)
    for control in controls:
        control.close()
    return errors


def close_transports(transports: list) -> list[str]:
    """Close each transport (its regions unregistered and freed); the errors of those that
    could not be closed."""
    errors = []
    for transport in transports:
        try:
            transport.close()
        except SegmentationError as error:
            errors.append(str(error))
    return errors


def is_network_of(metadata: dict, spatial_dims: int) -> bool:
    """True for a network's metadata: one input ``[-1, C, *tile]`` with C and the tile fixed
    (the pipeline's steps take any size: all their dimensions are -1)."""
    inputs = metadata.get("inputs") or []
    if len(inputs) != 1:
        return False
    shape = [int(d) for d in inputs[0]["shape"]]
    return len(shape) == spatial_dims + 2 and all(d > 0 for d in shape[1:])


class SegmentationClient:
    """Client of the ``segment_2d`` (or ``segment_3d``) ensemble over one transport.

    Args:
        url: ``host:port`` (default 127.0.0.1:8001 for gRPC and shared memory, :8000 for HTTP),
            or several (a list or ``"a:8001,b:8001"``): each request then goes to the server
            with the fewest requests in flight, and a request that fails there for a passing
            reason is sent to another at once (``client.servers``; counts in ``servers``).
        transport: ``grpc``, ``http``, ``shm`` or ``cuda-shm``.
        model: ensemble to call.
        network: network model to use (None: the server's default).
        timeout_s: per-request deadline in seconds (None: no deadline).
        headers: extra headers sent with every call.
        token: token of the server's restricted endpoints (shared-memory registration, model
            configuration); default ``$SEGSERVE_TOKEN`` or the token file the server wrote
            (``client.auth``). Inference itself needs none.
        device_id: GPU of CUDA shared-memory regions.
        cooldown_s: how long a server that failed is passed over while others answer.

    Patience: the ``patience_s`` of ``segment_stream`` and ``segment_volume`` is measured on
    the client's ``outage`` (``client.stream.Outage``), shared by everything it sends: how
    long its servers have been failing, from the first passing failure after the last success
    (reset by any success). Once it has lasted longer than the patience, each further frame is
    tried once, so a run against servers gone for good ends about one patience after they went.

    Thread safety: one client may be used from several threads at once (``segment``,
    ``segment_stream``, ``segment_volume``). Each call takes in-flight slots (a connection and,
    for shared memory, its regions) from the client's pool for its own use and puts them back
    when it ends, so no slot serves two requests at once; the pool grows to the most slots in
    use together. ``close()`` waits (up to ``STOP_GRACE_S``) for the requests other threads
    have in flight, then frees everything; a stream still running over the client then ends
    with a SegmentationError, and any further call is refused.
    """

    def __init__(self, url: str | list[str] | None = None, *, transport: str = "grpc", model: str = "segment_2d",
                 network: str | None = None, timeout_s: float | None = None,
                 headers: dict[str, str] | None = None, token: str | None = None, device_id: int = 0,
                 cooldown_s: float = DEFAULT_COOLDOWN_S):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if transport == "cuda-shm":
            check_cuda(device_id)
        self.transport, self.model, self.network = transport, model, network
        self.protocol = "http" if transport == "http" else "grpc"
        self.urls = split_urls(url, DEFAULT_URLS[self.protocol])
        self.url = self.urls[0]
        self.timeout_s, self.device_id = timeout_s, device_id
        self.headers = {**(headers or {}), **token_headers(resolve_token(token), self.protocol)}
        self.servers = ServerPool(self.urls, cooldown_s)
        self.outage = Outage()  # how long the servers have been failing: the patience's clock
        # Control calls (readiness, configuration, region cleanup) get their own fixed deadline:
        # a short per-frame timeout must not make a busy server look absent.
        self._controls = [Connection(u, self.protocol, self.headers, CONTROL_TIMEOUT_S) for u in self.urls]
        self._ready_control: Connection | None = None
        self._slots: list[dict[int, object]] = []  # per in-flight slot: server index -> transport
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots_lock = threading.Lock()
        # Slots in a request, in any thread (``_request``): close() waits for them, except those
        # let go of by a stream that already stopped waiting for them (``_let_go``).
        self._busy: set[int] = set()
        self._let_go: set[int] = set()
        self._requests_ended = threading.Condition(self._slots_lock)
        self._network_info: NetworkInfo | None = None
        self._spatial_dims: int | None = None
        self.stale_regions_removed: list[str] = []
        self.closed = False
        # Regions are freed even if the caller forgets close(): when the client is collected,
        # or at exit (a weak reference: an unclosed client can still be collected).
        self._pid = os.getpid()
        self._release = weakref.finalize(self, release_slots_and_controls, self._slots, self._slots_lock,
                                         self._controls, self._pid)
        if transport in SHM_KINDS:
            self._remove_stale_regions()

    def _remove_stale_regions(self) -> None:
        for control in self._controls:
            try:
                self.stale_regions_removed += remove_stale_regions(control, SHM_KINDS[self.transport])
            except SegmentationError as error:
                if error.retryable and len(self._controls) > 1:
                    continue  # that server is down; the others still serve
                self.close()
                raise

    @property
    def _control(self) -> Connection:
        """Control connection (configuration, metadata): the only server's, or the first one
        found with the model ready, remembered (no readiness round trip per call)."""
        self._check_process()
        if self._ready_control is None:
            if len(self._controls) == 1:
                self._ready_control = self._controls[0]
            else:
                ready = next((c for c in self._controls if c.is_model_ready(self.model)), None)
                if ready is None:  # none ready yet: one that answers at all; look again next time
                    return next((c for c in self._controls if c.is_server_live()), self._controls[0])
                self._ready_control = ready
        return self._ready_control

    def _new_transport(self, server: int):
        connection = Connection(self.urls[server], self.protocol, self.headers, self.timeout_s)
        if self.transport in SHM_KINDS:
            return SharedMemoryTransport(connection, SHM_KINDS[self.transport], self.device_id)
        return InlineTransport(connection)

    def _check_open(self) -> None:
        self._check_process()
        if self.closed:
            raise SegmentationError("this SegmentationClient is closed; make a new one")

    def _check_stream_open(self) -> None:
        """End a stream whose client was closed while it ran (its requests are refused since)."""
        if self.closed:
            raise SegmentationError("this SegmentationClient was closed while a segment_stream over it was running "
                                    "(close(), or the end of its with block, came before the stream's end); the stream "
                                    "ends here, its remaining frames not segmented")

    def _check_process(self) -> None:
        """Refuse use in a process forked from the one that made the client: its connections
        and shared-memory regions are the parent's (two processes wrote frames into the same
        regions and got each other's masks; an HTTP call waited for the parent's thread)."""
        if os.getpid() != self._pid:
            raise SegmentationError(f"this SegmentationClient was made in process {self._pid} and cannot be used in "
                                    f"process {os.getpid()}, forked from it (multiprocessing, a process pool); "
                                    "make one in each process, e.g. in the pool's initializer")

    def _take_slot(self) -> dict:
        """An in-flight slot (server index -> transport) owned by the caller until
        ``_return_slot``: an idle one, else a new one. No slot serves two requests at once."""
        self._check_open()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            with self._slots_lock:
                self._slots.append({})
                return self._slots[-1]

    def _return_slot(self, slot: dict) -> None:
        self._idle.put(slot)

    def _discard_slot(self, slot: dict) -> None:
        """Close a slot that must not be reused (its regions unregistered and freed), unless
        ``close()`` took it first (it closes every slot it finds)."""
        with self._slots_lock:
            owned = any(kept is slot for kept in self._slots)
            self._slots[:] = [kept for kept in self._slots if kept is not slot]
        if owned:
            close_transports(list(slot.values()))

    @contextlib.contextmanager
    def _request(self, slot: dict) -> Iterator[None]:
        """Hold the client open for one request on ``slot`` (in any thread): refused once it is
        closed; ``close()`` waits for the request to end before it frees the slot's regions."""
        with self._slots_lock:
            self._check_open()
            self._busy.add(id(slot))
        try:
            yield
        finally:
            with self._requests_ended:
                self._busy.discard(id(slot))
                self._let_go.discard(id(slot))
                self._requests_ended.notify_all()

    def _let_go_of(self, slots: list[dict]) -> None:
        """Requests on ``slots`` a stream stopped waiting for (up to its grace): ``close()``
        does not wait for them again."""
        with self._requests_ended:
            self._let_go.update(id(slot) for slot in slots if id(slot) in self._busy)
            self._requests_ended.notify_all()

    def _transports(self):
        with self._slots_lock:
            return [transport for slot in self._slots for transport in slot.values()]

    @property
    def regions_created(self) -> int:
        """Shared-memory regions created so far (reuse keeps this at slots x outputs)."""
        return sum(t.regions.created for t in self._transports() if isinstance(t, SharedMemoryTransport))

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Unregister and free every shared-memory region; close the connections. Idempotent;
        the client takes no requests afterwards. Requests other threads have in flight (a
        stream's workers) are waited for up to ``grace_s`` seconds first, so that none makes
        regions after they were freed; a stream still live then ends with a SegmentationError."""
        with self._requests_ended:
            self.closed = True
            if os.getpid() == self._pid:  # a forked copy's counts are its parent's
                self._requests_ended.wait_for(lambda: self._busy <= self._let_go, timeout=grace_s)
        errors = self._release() or []  # None once released
        self._idle = queue.LifoQueue()
        if errors:
            raise SegmentationError(f"cleanup incomplete: {'; '.join(errors)}")

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def is_ready(self) -> bool:
        """True when at least one server has the model ready (see ``unready_servers``)."""
        return len(self.unready_servers()) < len(self.urls)

    def wait_for_recovery(self, longest_s: float) -> None:
        """The wait before a retry: ``longest_s``, cut short once a server that had the model
        unready has it ready again (``client.stream.wait_for_recovery``); ended by ``close()``
        (the closed client's error: a stream's retry must not outlive it)."""

        def ready() -> bool:
            self._check_open()
            return self.is_ready()

        wait_for_recovery(longest_s, ready)

    def unready_servers(self) -> list[str]:
        self._check_process()
        return [c.url for c in self._controls if not c.is_model_ready(self.model)]

    def live_servers(self) -> list[str]:
        """Servers that answer at all (their model may still be loading)."""
        self._check_process()
        return [c.url for c in self._controls if c.is_server_live()]

    def _with_patience(self, fetch: Callable[[], T], patience_s: float) -> T:
        """``fetch()``, tried again after a passing failure (a model reloading after its stub
        died answers "no available versions") for up to ``patience_s`` seconds; 0: once."""
        value, _ = call_with_retries(fetch, RetryPolicy(patience_s=patience_s), sleep=self.wait_for_recovery)
        return value

    def network_info(self, patience_s: float = 0.0) -> NetworkInfo:
        """The network this client's requests run: the ``network`` argument, else the
        pipeline's default (its ``default_network`` parameter). Asked once, then remembered;
        ``patience_s``: how long a passing failure of that question is ridden out."""
        if self._network_info is None:
            self._network_info = self._with_patience(self._fetch_network_info, patience_s)
        return self._network_info

    def _fetch_network_info(self) -> NetworkInfo:
        name = self.network or self._default_network()
        which = f"network {name!r}" if self.network else f"the pipeline's default network {name!r}"
        try:
            metadata = self._control.model_metadata(name)
        except SegmentationError as error:
            failure = self._control.load_failure(name) if error.retryable else None
            if failure is not None:  # not worth the patience: it will not load until it is mended
                raise SegmentationError(f"{which} failed to load on {self._control.url}: {failure}; loaded "
                                        f"{self._loaded_networks()}") from None
            if error.retryable:  # being reloaded: "no available versions"
                raise
            raise SegmentationError(f"{which} is not loaded on {self._control.url} ({error}); loaded "
                                    f"{self._loaded_networks()}. A network exported since the server started is "
                                    "loaded when it restarts; one that failed to load is named in the server's "
                                    "warnings") from None
        if not is_network_of(metadata, self.spatial_dims()):  # --network segment_3d: a pipeline
            raise SegmentationError(f"{which} on {self._control.url} is not a {self.spatial_dims()}D network (a "
                                    f"pipeline? a network of other dimensions?); loaded {self._loaded_networks()}")
        image_shape = [int(d) for d in metadata["inputs"][0]["shape"]]
        return NetworkInfo(name, image_shape[1], int(metadata["outputs"][0]["shape"][1]), tuple(image_shape[2:]))

    def _loaded_networks(self) -> str:
        """"2D networks: a, b": the loaded networks of this client's pipeline's dimensions."""
        loaded = [model for model in self._control.loaded_models()
                  if is_network_of(self._control.model_metadata(model), self.spatial_dims())]
        return f"{self.spatial_dims()}D networks: {', '.join(loaded) or 'none'}"

    def spatial_dims(self, patience_s: float = 0.0) -> int:
        """2 for ``segment_2d``, 3 for ``segment_3d``: from the pipeline's metadata (open to
        all; the network's configuration needs the token). ``patience_s``: as ``network_info``."""
        return self._pipeline_dims(RetryPolicy(patience_s=patience_s))

    def _pipeline_dims(self, policy: RetryPolicy, outage: Outage | None = None) -> int:
        """``spatial_dims``, a passing failure of its question retried under ``policy``, on
        ``outage`` (None: the question's own clock, from its first failure)."""
        if self._spatial_dims is None:
            inputs, _ = call_with_retries(lambda: self._control.model_metadata(self.model)["inputs"], policy,
                                          sleep=self.wait_for_recovery, outage=outage)
            self._spatial_dims = len(inputs[0]["shape"]) - 1
        return self._spatial_dims

    def _default_network(self) -> str:
        """The pipeline's default network: from the sliding-window step's configuration when
        the token allows reading it, else from the open endpoints (``_only_network``)."""
        try:
            return self._configured_default_network()
        except SegmentationError as error:
            if TRITON_RESTRICTED_PHRASE not in str(error):
                raise
        return self._only_network()

    def _configured_default_network(self) -> str:
        """The ``default_network`` parameter of the pipeline model (``segment_2d`` is one Python
        model), else of the first step that has one (an ensemble, e.g. ``segment_2d_uint16``)."""
        config = self._control.model_config(self.model)
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        for parameters in [config.get("parameters", {}),
                           *(self._control.model_config(step["model_name"]).get("parameters", {}) for step in steps)]:
            if DEFAULT_NETWORK_PARAMETER in parameters:
                return parameters[DEFAULT_NETWORK_PARAMETER]["string_value"]
        raise SegmentationError(f"model {self.model!r} has no default network; pass network=...")

    def _only_network(self) -> str:
        """Without the token: the one loaded network of this pipeline's spatial dimensions
        (statistics and metadata are open to all). Several: the caller must name one."""
        networks = [name for name in self._control.loaded_models()
                    if is_network_of(self._control.model_metadata(name), self.spatial_dims())]
        if len(networks) == 1:
            return networks[0]
        found = ", ".join(networks) or "none"
        raise SegmentationError(f"cannot tell the default network of {self.model!r} without the server's token "
                                f"({len(networks)} {self.spatial_dims()}D networks loaded: {found}); pass "
                                "network=... (--network) or the token")

    def _segment_on(self, slot: dict, image, options: SegmentOptions) -> SegmentationResult:
        """One request on the least busy server; on a passing failure, at once on the next
        server not yet tried (the caller's retries take over when all have failed)."""
        with self._request(slot):
            num_classes = self.network_info().num_classes if options.probabilities else None
            specs = output_specs(tuple(image.shape[1:]), options.probabilities, options.contour, num_classes)
            tried: set[int] = set()
            while True:
                server = self.servers.acquire(exclude=tried)
                try:
                    if server not in slot:
                        slot[server] = self._new_transport(server)
                    outputs = slot[server].infer(self.model, image, specs, options.parameters(self.network))
                except SegmentationError as error:
                    self.servers.release(server, failed=error.retryable)
                    tried.add(server)
                    if not error.retryable or len(tried) == len(self.urls) or self.closed:
                        raise with_volume_hint(error, image.shape, self.model, self._spatial_dims) from None
                    continue
                self.servers.release(server, failed=False)
                return SegmentationResult(outputs["MASK"], outputs.get("PROBABILITIES"), outputs.get("CONTOUR"))

    def segment(self, frame, **options) -> SegmentationResult:
        """Segment one frame ``[H, W]`` or ``[C, H, W]`` (a volume ``[D, H, W]`` or
        ``[C, D, H, W]`` with a 3D model; float32, uint8, uint16 or int16; numpy, or a
        torch/CuPy tensor) in one request. Keyword options: see ``SegmentOptions``.

        Raises:
            ValueError: unsupported pixel type or rank (checked before sending).
            SegmentationError: the server's error, e.g. a bad option value.
        """
        image = as_channel_first(frame, self.spatial_dims())
        settings = SegmentOptions.of(**options)
        slot = self._take_slot()
        try:  # one attempt; its answer (or a passing failure) still counts in the client's outage
            result, _ = call_with_retries(lambda: self._segment_on(slot, image, settings), RetryPolicy(retries=0),
                                          outage=self.outage)
            return result
        finally:
            self._return_slot(slot)

    def segment_volume(self, volume, *, chunks: ChunkSettings = ChunkSettings(), inflight: int = 2,
                       retries: int | None = None, patience_s: float = DEFAULT_PATIENCE_S, progress=None,
                       **options) -> SegmentationResult:
        """Segment a volume ``[D, H, W]`` or ``[C, D, H, W]`` (numpy) of any size: beyond
        ``chunks.max_voxels`` it goes as overlapping chunks on the network's tile grid,
        ``inflight`` at a time, stitched so the result equals one whole-volume request.
        ``progress(done, total)`` is called with (0, total) first, then per chunk done. See
        ``client.volumes``."""
        checked = dataclasses.asdict(SegmentOptions.of(**options))  # refused here, not once per chunk
        return segment_volume(self, volume, chunks=chunks, inflight=inflight, retries=retries, patience_s=patience_s,
                              progress=progress, **{name: checked[name] for name in options})

    def segment_stream(self, frames: Iterable, *, inflight: int = 4, retries: int | None = None,
                       backoff_s: float = 0.5, patience_s: float = DEFAULT_PATIENCE_S, **options) -> Iterator[Outcome]:
        """Segment many frames with ``inflight`` requests at once; yields one ``Outcome`` per
        frame in input order (``outcome.result`` a SegmentationResult, or ``outcome.error``).

        Args:
            frames: arrays (each copied as it is taken, so a source may refill one buffer),
                or ``(index, load)`` pairs where ``load()`` returns a new array each call
                (lets a reader stream from disk; a load error fails only that frame).
            inflight: requests in flight (one connection and set of regions each).
            retries: most further attempts for a frame that failed for a retryable reason
                (server busy or restarting, connection lost, deadline passed, a failure the
                server marked transient); None: as many as ``patience_s`` allows.
            backoff_s: wait before the first retry; doubles each time, up to 5 s.
            patience_s: how long the servers may keep failing for passing reasons before
                frames are given up (default 600 s: a full server restart on a busy machine
                fits). Measured on the client's ``outage``, shared by every frame and stream:
                once it is spent, each further frame gets one attempt; any success resets it.
        """
        settings = SegmentOptions.of(**options)  # bad settings are refused here, not at the first next()
        policy = RetryPolicy(retries=retries, backoff_s=backoff_s, patience_s=patience_s)
        check_inflight(inflight)
        self._check_open()
        return self._stream(frames, inflight, policy, settings)

    def _stream(self, frames: Iterable, inflight: int, policy: RetryPolicy, settings: SegmentOptions) -> Iterator[Outcome]:
        # Its first question (a new client's: a Dask worker's) rides out an outage as its frames do;
        # asked once, its failure failed every task a worker began during a server restart.
        try:
            spatial_dims = self._pipeline_dims(policy, self.outage)
        except SegmentationError as error:  # no server answered it within the patience: each item fails so
            for index, _ in _as_items(frames):
                yield Outcome(index, error=str(error), attempts=1, retryable=error.retryable)
            return
        slots = [self._take_slot() for _ in range(inflight)]  # this stream's own, returned at its end
        # Workers still in a request when the stream stopped waiting for them (a break out of
        # a slow stream): their slots are closed by the worker once its request ends, never reused.
        abandoned: set[int] = set()
        abandoned_lock = threading.Lock()

        def process(worker: int, frame):
            try:
                return self._segment_on(slots[worker], as_channel_first(frame, spatial_dims), settings)
            finally:
                with abandoned_lock:
                    discard = worker in abandoned
                if discard:
                    self._discard_slot(slots[worker])

        def stopped(still_running: set[int]) -> None:
            with abandoned_lock:
                abandoned.update(still_running)
            self._let_go_of([slots[worker] for worker in still_running])

        outcomes = ordered_stream(_as_items(frames, spatial_dims), process, inflight, policy, self.wait_for_recovery,
                                  self.outage, on_stopped=stopped)
        try:
            for outcome in outcomes:
                self._check_stream_open()  # closed from another thread while this one waited
                yield outcome
                self._check_stream_open()  # closed while the caller held the outcome (a with block left)
        finally:
            outcomes.close()
            for worker, slot in enumerate(slots):
                if worker not in abandoned:
                    self._return_slot(slot)


def _as_items(frames: Iterable, spatial_dims: int = 2) -> Iterator[tuple[int, object]]:
    """``(index, load)`` pairs as given, and each plain frame as a pair loading a copy of it
    taken now: the stream reads up to ``inflight`` frames ahead, and a source that refills one
    buffer (``read_direct``, a detector's) would otherwise have a frame overwritten before it
    was sent, and get another frame's mask for it.

    Raises:
        TypeError: a pair whose second item is no ``load`` callable (``enumerate(frames)``
            gives ``(index, frame)``), naming what it holds and what the stream takes.
    """
    for index, frame in enumerate(frames):
        if isinstance(frame, tuple) and len(frame) == 2:
            if not callable(frame[1]):
                raise TypeError(not_a_stream_item(index, frame, spatial_dims))
            yield frame
        else:
            yield index, (lambda f=snapshot(frame): f)


def not_a_stream_item(position: int, item: tuple, spatial_dims: int) -> str:
    """Why ``item``, the stream's item number ``position``, is refused, and what to give instead."""
    axes = ", ".join("DHW"[-spatial_dims:])
    held = ", ".join(type(value).__name__ for value in item)
    return (f"segment_stream takes {spatial_dims}D arrays [{axes}] or [C, {axes}] (numpy, torch, CuPy), or "
            f"(index, load) pairs whose load() returns one; item {position} is a tuple ({held}) whose second item "
            "is not callable. For enumerate(frames) pass frames itself: each outcome.index is the frame's position")


# How the server refuses a frame whose channel count is not its network's (segserve.sliding_window).
CHANNELS_REFUSED = re.compile(r"takes (\d+) channel\(s\), IMAGE has (\d+)")


def with_volume_hint(error: SegmentationError, shape: tuple[int, ...], model: str,
                     spatial_dims: int | None) -> SegmentationError:
    """``error``, or for the server's refusal of a 2D frame ``shape`` ``[C, H, W]`` with more
    channels than its network takes (and no channels-last picture: the server says what to send
    for those), the same error saying that a volume ``[D, H, W]`` goes to the 3D pipeline."""
    refused = CHANNELS_REFUSED.search(str(error))
    if spatial_dims != 2 or refused is None or int(refused[2]) <= int(refused[1]) or looks_channels_last(shape):
        return error
    return SegmentationError(f"{error}; is it a volume [D, H, W]? model {model!r} takes 2D frames, {VOLUME_HINT}",
                             error.retryable)


def snapshot(frame):
    """A copy of a numpy array, torch tensor (on its device) or CuPy array; other sequences
    (lists) as they are (they are converted into a new array anyway)."""
    if isinstance(frame, np.ndarray):
        return frame.copy()
    if hasattr(frame, "clone"):  # torch
        return frame.detach().clone()
    if hasattr(frame, "copy") and hasattr(frame, "shape"):  # CuPy
        return frame.copy()
    return frame
