"""The token of the server's restricted endpoints, shared by the launcher and the client.

The server restricts ``RESTRICTED_ENDPOINTS`` (shared-memory registration, model configuration
and repository control, tracing, logging) to requests carrying the token in a header:
``segserve-token`` over HTTP, ``triton-grpc-protocol-segserve-token`` over gRPC (Triton
prefixes the key of gRPC restrictions); inference, health and metadata stay open. A client finds the token in, by priority: its
``token`` argument, ``$SEGSERVE_TOKEN``, or the token file ``python -m segserve serve`` writes
(``$SEGSERVE_TOKEN_FILE``, default ``~/.config/segserve/token``, readable by its owner only).
"""

from __future__ import annotations

import os
import pathlib
import secrets

TOKEN_HEADER = "segserve-token"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
TOKEN_ENV = "SEGSERVE_TOKEN"
TOKEN_FILE_ENV = "SEGSERVE_TOKEN_FILE"
RESTRICTED_ENDPOINTS = ("shared-memory", "model-config", "model-repository", "trace", "logging")


def default_token_file() -> pathlib.Path:
    configured = os.environ.get(TOKEN_FILE_ENV)
    return pathlib.Path(configured) if configured else pathlib.Path.home() / ".config" / "segserve" / "token"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def write_token_file(token: str, path: pathlib.Path | None = None) -> pathlib.Path:
    """Write ``token`` to ``path`` (default: the token file) readable by its owner only."""
    path = path or default_token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)
    return path


def resolve_token(token: str | None = None) -> str | None:
    """The token to send: the argument, else ``$SEGSERVE_TOKEN``, else the token file, else None."""
    if token:
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    try:
        return default_token_file().read_text().strip() or None
    except OSError:
        return None


def header_name(protocol: str) -> str:
    """The header Triton checks for the token: its gRPC restrictions prefix the key."""
    return f"{GRPC_HEADER_PREFIX}{TOKEN_HEADER}" if protocol == "grpc" else TOKEN_HEADER


def token_headers(token: str | None, protocol: str) -> dict[str, str]:
    return {header_name(protocol): token} if token else {}
