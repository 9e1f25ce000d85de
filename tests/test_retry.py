"""Retry what can pass, only that. The server marks its own passing failures at the source
(``segserve.backend.tensors.error_response``); Triton's own wording of passing failures is
matched in one place (``segproto.TRITON_TRANSIENT_PHRASES``), each phrase checked here on the
Triton version that runs. A deterministic failure is never retried and never cools a server
down, even with several servers."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import SegmentationClient, SegmentationError
from client.__main__ import main as client_main
from client.connection import is_transient
from segproto import TRANSIENT_MARKER, TRITON_RESTRICTED_PHRASE, TRITON_TRANSIENT_PHRASES, is_transient_message
from segserve.launcher import free_ports
from tests.conftest import DEFAULT_NETWORK, FAULTY_MODEL, GOOD_FRAME, SECOND_NETWORK

BUG_FRAME = np.full((1, 16, 16), -1.0, dtype=np.float32)
MEMORY_SHORT_FRAME = np.full((1, 16, 16), -2.0, dtype=np.float32)


@pytest.mark.parametrize("status, message, transient", [
    ("", "failed to connect to all addresses; Connection refused", True),  # never reached the server
    ("StatusCode.UNAVAILABLE", "Socket closed", True),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", True),
    ("503", "service unavailable", True),
    ("StatusCode.INTERNAL", f"{TRANSIENT_MARKER} faulty_2d could not allocate", True),
    ("StatusCode.INTERNAL", "division by zero in faulty_2d", False),  # a bug: fails every time
    ("StatusCode.UNKNOWN", "boom", False),
    ("500", "division by zero", False),
    ("StatusCode.INVALID_ARG", "overlap must be in [0, 1)", False),
    ("StatusCode.UNAVAILABLE", f"This protocol {TRITON_RESTRICTED_PHRASE}, expecting header", False),
])
def test_transient_or_final(status, message, transient):
    assert is_transient(status, message) is transient


def test_every_triton_phrase_is_pinned_to_a_version():
    assert all(TRITON_TRANSIENT_PHRASES.values())
    assert not any(is_transient_message(m) for m in ("overlap must be in [0, 1)", "IMAGE is empty"))


@pytest.fixture
def two_names_one_server(server):
    """The session's server under two addresses: a pool of two 'servers' whose counts show
    whether a failure cooled one down."""
    with SegmentationClient([server.grpc_url, server.grpc_url.replace("127.0.0.1", "localhost")],
                            model=FAULTY_MODEL) as client:
        yield client


def test_a_server_bug_is_not_retried_and_cools_nobody_down(two_names_one_server):
    client = two_names_one_server
    with pytest.raises(SegmentationError, match="division by zero") as failed:
        client.segment(BUG_FRAME)
    assert not failed.value.retryable and TRANSIENT_MARKER not in str(failed.value)
    [outcome] = client.segment_stream([BUG_FRAME], inflight=1, retries=3, backoff_s=0.01)
    assert not outcome.ok and outcome.attempts == 1
    assert all(s.failed == 0 and s.down_until == 0 for s in client.servers.servers)


def test_a_failure_the_server_marks_transient_is_retried_on_every_server(two_names_one_server):
    client = two_names_one_server
    with pytest.raises(SegmentationError, match="could not allocate") as failed:
        client.segment(MEMORY_SHORT_FRAME)
    assert failed.value.retryable and str(failed.value).startswith(TRANSIENT_MARKER)
    assert sum(s.failed for s in client.servers.servers) == 2  # tried on the other at once
    [outcome] = client.segment_stream([MEMORY_SHORT_FRAME], inflight=1, retries=2, backoff_s=0.01)
    assert not outcome.ok and outcome.attempts == 3


def test_request_errors_are_final(server):
    with SegmentationClient(server.grpc_url, network="no_such_network") as client:
        [outcome] = client.segment_stream([GOOD_FRAME], inflight=1, retries=3, backoff_s=0.01)
    assert not outcome.ok and outcome.attempts == 1 and "no_such_network" in outcome.error
    assert client.servers.servers[0].failed == 0


def triton_version(server) -> str:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return client.get_server_metadata(as_json=True)["version"]


def test_triton_wording_matched_is_this_versions(server):
    """The phrases are Triton's, checked on the version that runs; the image's 2.59 is checked
    only where it runs (the phrases name the version they were seen on)."""
    version = ".".join(triton_version(server).split(".")[:2])
    unchecked = [phrase for phrase, seen_on in TRITON_TRANSIENT_PHRASES.items() if version not in seen_on.split(",")]
    assert not unchecked, f"Triton {version}: check these phrases and record the version: {unchecked}"
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as restricted:
            client.get_model_config("segment_2d")
        assert TRITON_RESTRICTED_PHRASE in restricted.value.message()
        image = grpcclient.InferInput("IMAGE", list(GOOD_FRAME.shape), "FP32")
        image.set_shared_memory("segclient_never_registered", GOOD_FRAME.nbytes)
        with pytest.raises(InferenceServerException) as forgotten:
            client.infer("segment_2d", [image])
        assert "Unable to find shared memory region" in forgotten.value.message()
        with pytest.raises(InferenceServerException) as absent:
            client.infer("no_such_model", [image])
        assert not is_transient(str(absent.value.status()), absent.value.message())
        # A dead stub, then its model being reloaded: what the launcher's recovery goes through.
        frame = grpcclient.InferInput("IMAGE", list(GOOD_FRAME.shape), "FP32")
        frame.set_data_from_numpy(GOOD_FRAME)
        [stub] = [pid for pid, model in server.stub_processes().items() if f"/{FAULTY_MODEL}/" in model]
        os.kill(stub, signal.SIGKILL)
        while psutil.pid_exists(stub) and psutil.Process(stub).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)  # dead (tritonserver reaps its stubs only when it unloads them)
        try:
            with pytest.raises(InferenceServerException) as dead:
                client.infer(FAULTY_MODEL, [frame])
            client.unload_model(FAULTY_MODEL, headers=server.token_headers("grpc"))
            with pytest.raises(InferenceServerException) as reloading:
                client.infer(FAULTY_MODEL, [frame])
        finally:
            client.load_model(FAULTY_MODEL, headers=server.token_headers("grpc"))
        for failure, phrase in ((dead, "is not healthy"), (reloading, "no available versions")):
            assert phrase in failure.value.message(), failure.value.message()
            assert is_transient(str(failure.value.status()), failure.value.message())
        assert client.is_model_ready(FAULTY_MODEL)  # a new stub for the other tests


@pytest.mark.parametrize("reloading, options, waiting", [
    (SECOND_NETWORK, ["--network", SECOND_NETWORK], "client: the network is not available yet"),
    (FAULTY_MODEL, ["--model", FAULTY_MODEL, "--network", DEFAULT_NETWORK], f"model {FAULTY_MODEL!r} is not available yet"),
], ids=["network", "pipeline"])
def test_a_command_started_while_a_model_reloads_rides_it_out(server, tmp_path, capsys, reloading, options, waiting):
    """`serve` reloading a model after its stub died (unload, then load): a command started
    meanwhile says it waits (its first question, the pipeline's or the network's metadata, is
    answered "no available versions") and segments once the model is back, instead of failing
    before its first frame."""
    np.save(tmp_path / "f.npy", GOOD_FRAME[0])
    headers = server.token_headers("grpc")
    with grpcclient.InferenceServerClient(server.grpc_url) as control:
        control.unload_model(reloading, headers=headers)
        while control.is_model_ready(reloading):
            time.sleep(0.1)
        loader = threading.Timer(3.0, control.load_model, args=(reloading,), kwargs={"headers": headers})
        loader.start()
        try:
            code = client_main(["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path / "out"), "--url",
                                server.grpc_url, *options, "--no-overlay", "--no-progress", "--patience", "120"])
        finally:
            loader.join()
            if not control.is_model_ready(reloading):
                control.load_model(reloading, headers=headers)
    err = capsys.readouterr().err
    assert code == 0, err
    assert waiting in err and "no available versions" in err
    assert (tmp_path / "out" / "f_mask.tif").exists()


@pytest.mark.parametrize("protocol, servers", [("grpc", "one"), ("http", "one"), ("grpc", "a dead one first")])
@pytest.mark.parametrize("option", ["--model", "--network"])
def test_a_command_naming_an_unknown_model_fails_at_once(server, tmp_path, capsys, protocol, servers, option):
    """A typo is no reload: told at once, not after --patience (the error is not retried),
    also when the first of several servers is down (the server that answers is asked)."""
    np.save(tmp_path / "f.npy", GOOD_FRAME[0])
    url = server.grpc_url if protocol == "grpc" else server.http_url
    if servers == "a dead one first":
        url = f"127.0.0.1:{free_ports(1)[0]},{url}"
    started = time.monotonic()
    code = client_main(["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path / "out"), "--url", url,
                        "--transport", protocol, option, "no_such_model", "--no-progress", "--patience", "300"])
    err = capsys.readouterr().err
    assert code == 1
    # Not a speed check: a retried error would take the whole 300 s; one refusal takes well under a second.
    assert time.monotonic() - started < 150
    [error] = [line for line in err.splitlines() if line.startswith("client: error: ")]
    assert "no_such_model" in error and "waiting" not in err
