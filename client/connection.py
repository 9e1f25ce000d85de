"""One connection to the server over gRPC or HTTP, with the two protocols' differences hidden.

tritonclient's gRPC and HTTP modules have the same classes with slightly different arguments
(timeouts, binary outputs, JSON status). ``Connection`` is the one place that knows them.
"""

from __future__ import annotations

import threading

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from segproto import TRITON_RESTRICTED_PHRASE, is_transient_message

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


def as_segmentation_error(error: Exception) -> SegmentationError:
    """tritonclient's exception (or a socket error under it) as a SegmentationError."""
    if isinstance(error, InferenceServerException):
        status = str(error.status()) if error.status() is not None else ""
        message = error.message() or str(error)
        if TRITON_RESTRICTED_PHRASE in message:
            return SegmentationError(f"{message} (pass the server's token: --token, $SEGSERVE_TOKEN or the token file)")
        return SegmentationError(message, retryable=is_transient(status, message))
    return SegmentationError(f"{type(error).__name__}: {error}", retryable=True)


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
        self._per_thread = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()

    @property
    def client(self):
        """The tritonclient client for this thread. The gRPC one is shared (gRPC channels are
        thread-safe); HTTP clients run on gevent and work only in the thread that made them,
        so each thread gets its own."""
        if self.protocol == "grpc":
            with self._lock:
                if not self._clients:
                    self._clients.append(grpcclient.InferenceServerClient(self.url))
                return self._clients[0]
        client = getattr(self._per_thread, "client", None)
        if client is None:
            network_timeout = self.timeout_s if self.timeout_s is not None else 86400.0
            client = httpclient.InferenceServerClient(self.url, network_timeout=network_timeout,
                                                      connection_timeout=network_timeout)
            self._per_thread.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a gevent client closed from another thread may complain; it is gone anyway
                pass
        self._per_thread = threading.local()

    def call(self, method: str, *args, **kwargs):
        """``client.<method>(*args, headers=..., **kwargs)``, errors as SegmentationError."""
        try:
            return getattr(self.client, method)(*args, headers=self.headers or None, **kwargs)
        except Exception as error:  # tritonclient raises its own type, gevent/grpc socket errors too
            raise as_segmentation_error(error) from None

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
