"""Endpoint security: sensitive endpoints answer only token holders, over gRPC and HTTP;
inference, health and metadata stay open; the server listens on 127.0.0.1 only."""

from __future__ import annotations

import ipaddress

import numpy as np
import psutil
import pytest
from tritonclient.utils import InferenceServerException

from client import SegmentationClient, SegmentationError
from client.auth import RESTRICTED_ENDPOINTS, TOKEN_ENV, TOKEN_FILE_ENV
from tests.conftest import FAULTY_MODEL

# One call per restricted endpoint: (endpoint, method, arguments).
RESTRICTED_CALLS = [
    ("shared-memory", "get_system_shared_memory_status", ()),
    ("shared-memory", "register_system_shared_memory", ("intruder", "/intruder", 64)),
    ("model-config", "get_model_config", ("segment_2d",)),
    ("model-repository", "get_model_repository_index", ()),
    ("model-repository", "unload_model", ("segment_2d",)),
    ("trace", "get_trace_settings", ()),
    ("logging", "get_log_settings", ()),
]


def test_every_sensitive_endpoint_is_listed():
    assert {call[0] for call in RESTRICTED_CALLS} == set(RESTRICTED_ENDPOINTS)


@pytest.mark.parametrize("method, arguments", [c[1:] for c in RESTRICTED_CALLS], ids=[c[1] for c in RESTRICTED_CALLS])
def test_restricted_endpoint_refuses_a_client_without_the_token(endpoint, method, arguments):
    for headers in (None, {"segserve-token": "wrong"}, {"triton-grpc-protocol-segserve-token": "wrong"}):
        with pytest.raises(InferenceServerException, match="restricted"):
            getattr(endpoint.client, method)(*arguments, headers=headers)


def test_token_holder_is_served_and_only_they_may_reload_a_model(endpoint):
    """Model control is explicit (the launcher reloads a model whose stub died), restricted to
    token holders like the rest of the repository API."""
    client, token = endpoint.client, endpoint.token
    assert client.get_model_config("segment_2d", headers=token)
    assert client.get_log_settings(headers=token)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.load_model(FAULTY_MODEL)
    client.load_model(FAULTY_MODEL, headers=token)
    assert client.is_model_ready(FAULTY_MODEL) and client.is_model_ready("segment_2d")


def test_inference_health_and_metadata_need_no_token(endpoint):
    client = endpoint.client
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_model_metadata("segment_2d")
    frame = np.random.default_rng(0).random((1, 40, 50), dtype=np.float32)
    assert endpoint.infer({"IMAGE": frame}).as_numpy("MASK").shape == (40, 50)


def test_client_without_the_token_is_told_what_to_do(server, monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "no-token-here"))
    frame = np.zeros((30, 30), np.uint16)
    with SegmentationClient(server.grpc_url) as plain:  # inference needs no token
        assert plain.segment(frame).mask.shape == (30, 30)
    with pytest.raises(SegmentationError, match="restricted.*pass the server's token") as refused:
        SegmentationClient(server.grpc_url, transport="shm")
    assert not refused.value.retryable and "not this server's" not in str(refused.value)


def test_a_client_whose_token_is_another_servers_is_told_so(server, monkeypatch, tmp_path):
    """A wrong token was refused in the same words as none ("expecting header ..."): nothing
    pointed at a token file written by another server."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "token").write_text("the-token-of-another-server\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "token"))
    with pytest.raises(SegmentationError, match="the token sent is not this server's"):
        SegmentationClient(server.grpc_url, transport="shm")


def test_token_file_is_found_by_the_client(server, monkeypatch, tmp_path):
    from client.auth import write_token_file

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "segserve" / "token"))
    path = write_token_file(server.config.token)
    assert path.stat().st_mode & 0o777 == 0o600
    with SegmentationClient(server.grpc_url, transport="shm") as client:
        assert client.segment(np.zeros((30, 30), np.uint16)).mask.shape == (30, 30)


def test_server_listens_on_loopback_only(server):
    tree = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    listening = [c for p in tree for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    assert {server.config.grpc_port, server.config.http_port, server.config.metrics_port} <= ports
    assert all(is_loopback(c.laddr.ip) for c in listening), listening


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_new_tokens_can_be_given_on_a_command_line():
    """One token in 64 began with "-", and `--token TOKEN` then failed as an unknown option
    (a client run in the test suite exited 2 on one)."""
    import argparse

    from segproto import new_token

    tokens = [new_token() for _ in range(2000)]
    assert not [token for token in tokens if token.startswith("-")]
    parser = argparse.ArgumentParser()
    parser.add_argument("--token")
    assert all(parser.parse_args(["--token", token]).token == token for token in tokens[:200])
