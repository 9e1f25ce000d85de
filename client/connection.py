"""One connection to the server over gRPC or HTTP, with the two protocols' differences hidden.

tritonclient's gRPC and HTTP modules have the same classes with slightly different arguments
(timeouts, binary outputs, JSON status). ``Connection`` is the one place that knows them.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from segproto import TRITON_RESTRICTED_PHRASE, is_transient_message

T = TypeVar("T")

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# Statuses of failures that pass: the server or network busy, restarting or gone for a moment,
# or our own deadline. INTERNAL, UNKNOWN and HTTP 500 are not here: a server bug fails the same
# way every time; the server marks its own passing failures instead (segproto.TRANSIENT_MARKER).
TRANSIENT_STATUSES = {
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED", "502", "503", "504",
}


class SegmentationError(RuntimeError):
    """The server refused or failed the request; the message is the server's.

    Attributes:
        retryable: True when the same request may succeed later (server busy, restarting,
            connection lost, deadline passed, a failure the server marked transient); False for
            refusals such as bad input and for deterministic server failures.
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def is_transient(status: str, message: str) -> bool:
    """Whether a failure with tritonclient ``status`` (``str(error.status())``, "" when the
    client library never reached the server) and ``message`` may pass on a retry."""
    if TRITON_RESTRICTED_PHRASE in message:  # Triton answers a missing token with UNAVAILABLE (gRPC)
        return False
    return not status or status in TRANSIENT_STATUSES or is_transient_message(message)


def as_segmentation_error(error: Exception, token_sent: bool = False) -> SegmentationError:
    """tritonclient's exception (or a socket error under it) as a SegmentationError;
    ``token_sent``: whether the call carried a token (a refusal then means another one)."""
    if isinstance(error, InferenceServerException):
        status = str(error.status()) if error.status() is not None else ""
        message = error.message() or str(error)
        if TRITON_RESTRICTED_PHRASE in message:
            sent = ("; the token sent is not this server's (a token file written by another server?)"
                    if token_sent else "")
            return SegmentationError(f"{message} (pass the server's token: --token, $SEGSERVE_TOKEN or the token "
                                     f"file its `serve` wrote{sent})")
        return SegmentationError(message, retryable=is_transient(status, message))
    return SegmentationError(f"{type(error).__name__}: {error}", retryable=True)


def is_deadline(error: Exception) -> bool:
    """Whether ``error`` is a call's own deadline passing (gRPC's status, HTTP's socket timeout)."""
    if isinstance(error, InferenceServerException):
        return str(error.status()) == "StatusCode.DEADLINE_EXCEEDED"
    return isinstance(error, TimeoutError) or "Timeout" in type(error).__name__


class Connection:
    """A tritonclient client of one protocol plus the headers every call carries.

    Args:
        url: ``host:port``.
        protocol: ``grpc`` or ``http``.
        headers: sent with every call (e.g. the token of restricted endpoints).
        timeout_s: deadline of each call in seconds (None: none for gRPC; a day for HTTP, whose
            client always has a network timeout).
    """

    def __init__(self, url: str, protocol: str = "grpc", headers: dict[str, str] | None = None,
                 timeout_s: float | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.url, self.protocol, self.headers, self.timeout_s = url, protocol, dict(headers or {}), timeout_s
        self.module = grpcclient if protocol == "grpc" else httpclient
        self._timeout = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        self._lock = threading.Lock()
        self._grpc_client = None
        self._http_thread: HttpThread | None = None

    def _make_http_client(self):
        network_timeout = self.timeout_s if self.timeout_s is not None else 86400.0
        return httpclient.InferenceServerClient(self.url, network_timeout=network_timeout,
                                                connection_timeout=network_timeout)

    def _run(self, function: Callable[[object], T]) -> T:
        """``function(client)`` with this connection's tritonclient client. The gRPC client is
        shared by every thread (gRPC channels are thread-safe); the HTTP one runs on gevent,
        which works only in the thread that made it, so it lives in one thread of its own
        (``HttpThread``) that runs every HTTP call of this connection."""
        with self._lock:
            if self.protocol == "grpc":
                if self._grpc_client is None:
                    self._grpc_client = grpcclient.InferenceServerClient(self.url)
                client = self._grpc_client
            elif self._http_thread is None:
                self._http_thread = HttpThread(self._make_http_client, f"segment-http-{self.url}")
            http_thread = self._http_thread
        return function(client) if self.protocol == "grpc" else http_thread.run(function)

    def close(self) -> None:
        """Close the client (and the HTTP thread); a later call makes a new one."""
        with self._lock:
            grpc_client, self._grpc_client = self._grpc_client, None
            http_thread, self._http_thread = self._http_thread, None
        if grpc_client is not None:
            grpc_client.close()
        if http_thread is not None:
            http_thread.close()

    def call(self, method: str, *args, **kwargs):
        """``client.<method>(*args, headers=..., **kwargs)``, errors as SegmentationError."""
        try:
            return self._run(lambda client: getattr(client, method)(*args, headers=self.headers or None, **kwargs))
        except Exception as error:  # tritonclient raises its own type, gevent/grpc socket errors too
            failure = as_segmentation_error(error, token_sent=bool(self.headers))
            if self.timeout_s is not None and is_deadline(error):  # "Deadline Exceeded" alone named no option
                failure = SegmentationError(f"{failure} (no answer within the {self.timeout_s:g} s timeout: --timeout, "
                                            "timeout_s)", failure.retryable)
            raise failure from None

    def input(self, name: str, shape: list[int], triton_dtype: str):
        return self.module.InferInput(name, list(shape), triton_dtype)

    def requested_output(self, name: str):
        if self.protocol == "http":
            return httpclient.InferRequestedOutput(name, binary_data=True)
        return grpcclient.InferRequestedOutput(name)

    def infer(self, model: str, inputs: list, outputs: list, parameters: dict):
        return self.call("infer", model, inputs, outputs=outputs, parameters=parameters, **self._timeout)

    def output_shape(self, response, name: str) -> list[int]:
        output = response.get_output(name)
        if output is None:
            raise SegmentationError(f"the response has no {name} output")
        return [int(d) for d in (output["shape"] if self.protocol == "http" else output.shape)]

    def is_server_live(self) -> bool:
        try:
            return bool(self.call("is_server_live"))
        except SegmentationError:
            return False

    def is_model_ready(self, model: str) -> bool:
        try:
            return bool(self.call("is_model_ready", model))
        except SegmentationError:
            return False

    def model_config(self, model: str) -> dict:
        if self.protocol == "grpc":
            return self.call("get_model_config", model, as_json=True)["config"]
        return self.call("get_model_config", model)

    def model_metadata(self, model: str) -> dict:
        if self.protocol == "grpc":
            return self.call("get_model_metadata", model, as_json=True)
        return self.call("get_model_metadata", model)

    def load_failure(self, model: str) -> str | None:
        """Why ``model`` failed to load, from the repository index (restricted: None without the
        token, or when the index says it is loading, unloaded for a reload, or ready)."""
        try:
            index = self.call("get_model_repository_index", **({"as_json": True} if self.protocol == "grpc" else {}))
        except SegmentationError:
            return None
        entries = index.get("models", []) if isinstance(index, dict) else index  # gRPC's JSON, HTTP's list
        for entry in entries:
            reason = (entry.get("reason") or "").strip()
            if entry.get("name") == model and entry.get("state") == "UNAVAILABLE" and reason and reason != "unloaded":
                return reason.splitlines()[0]
        return None

    def loaded_models(self) -> list[str]:
        """Names of the models the server has loaded (the statistics endpoint: open to all)."""
        statistics = self.call("get_inference_statistics", as_json=True) if self.protocol == "grpc" \
            else self.call("get_inference_statistics")
        return sorted({model["name"] for model in statistics.get("model_stats", [])})

    def shared_memory_status(self, kind: str) -> list[dict]:
        """Registered regions of ``kind`` (``system`` or ``cuda``) as dicts with a ``name``."""
        method = f"get_{kind}_shared_memory_status"
        if self.protocol == "grpc":
            status = self.call(method, as_json=True)
            return list(status.get("regions", {}).values())
        return list(self.call(method))


class HttpThread:
    """One daemon thread running every call made through it with its own HTTP client.

    gevent clients work only in the thread that made them, and each thread that uses gevent
    gets a hub whose loop (an epoll and an eventfd) is freed only by destroying the hub in that
    thread. A client per calling thread left those behind with every thread: each stream's
    new workers, or a notebook's thread pools, ran the process out of file descriptors. One
    thread per connection, whose ``close`` closes the client and destroys the hub there,
    leaves nothing behind. A daemon, so a request hung without a deadline cannot keep the
    interpreter from exiting.
    """

    def __init__(self, make_client: Callable[[], object], name: str):
        self._make_client = make_client
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=name)
        self._thread.start()

    def run(self, function: Callable[[object], T]) -> T:
        """``function(client)`` in the HTTP thread; its result, or its exception raised here."""
        done = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise ConnectionError("the HTTP connection is closed")
            self._jobs.put((function, done))
        return done.result()

    def close(self, wait_s: float = 5.0) -> None:
        """Close the client and destroy the thread's gevent hub in that thread, once the calls
        queued before are done; waits for that up to ``wait_s`` (a request hung without a
        deadline must not hang the caller's cleanup: the thread ends when it does)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(wait_s)

    def _serve(self) -> None:
        client = None
        try:
            while (job := self._jobs.get()) is not None:
                function, done = job
                try:
                    if client is None:
                        client = self._make_client()
                    done.set_result(function(client))
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    done.set_exception(error)
        finally:
            self._release(client)

    @staticmethod
    def _release(client) -> None:
        import gevent

        try:
            if client is not None:
                client.close()
        finally:
            hub = gevent.get_hub()
            hub.destroy(destroy_loop=True)
            # destroy() leaves the hub's greenlet suspended in a cycle the garbage collector
            # cannot see (gevent issue 1601): finish it, so the hub and its frames are freed.
            if not hub.dead:
                hub.throw()
