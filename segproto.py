"""Names the client and the server share: tensor names, request parameters, the token of the
restricted endpoints, and how a failure says whether it may pass.

Dependency-free (standard library only) and imported by both ``client`` and ``segserve``, which
never import each other: the client distribution ships this file beside the ``client`` package.

Transient or not. A request can fail for a reason that passes (the server restarting or
reloading a model, memory momentarily short) or for one that does not (bad input, a bug).
The server marks its own passing failures at the source: the message starts with
``TRANSIENT_MARKER`` (and the status is UNAVAILABLE). Some passing failures are Triton's own and
carry only Triton's wording; ``TRITON_TRANSIENT_PHRASES`` is the one place that wording is
matched, each phrase checked against the Triton version named beside it (``tests/test_retry.py``).
Everything else is final: never retried, and never counted against a server.
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets

# Input tensor per pixel type (numpy dtype name -> (input name, Triton dtype)).
INPUT_BY_DTYPE_NAME = {
    "float32": ("IMAGE", "FP32"),
    "uint8": ("IMAGE_UINT8", "UINT8"),
    "uint16": ("IMAGE_UINT16", "UINT16"),
    "int16": ("IMAGE_INT16", "INT16"),
}
OUTPUT_MASK, OUTPUT_PROBABILITIES, OUTPUT_CONTOUR = "MASK", "PROBABILITIES", "CONTOUR"
PIPELINES = {2: "segment_2d", 3: "segment_3d"}  # the pipeline of each network dimension
# Model-config parameter of the sliding-window step naming its default network.
DEFAULT_NETWORK_PARAMETER = "default_network"
# Sliding-window overlap when a request names none. The client plans volume chunks on the
# server's window grid, so both must place windows alike.
DEFAULT_OVERLAP = 0.25
BLEND_MODES = ("gaussian", "constant")  # tile weighting; the first is the default
DEFAULT_BLEND = BLEND_MODES[0]


def scan_interval(tile: int, overlap: float) -> int:
    """Voxels between window starts along an axis longer than the tile, as MONAI's
    ``_get_scan_interval`` steps them."""
    return max(int(tile * (1 - overlap)), 1)


# Token of the restricted endpoints.
TOKEN_HEADER = "segserve-token"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton prefixes the key of gRPC restrictions
TOKEN_ENV = "SEGSERVE_TOKEN"
TOKEN_FILE_ENV = "SEGSERVE_TOKEN_FILE"
RESTRICTED_ENDPOINTS = ("shared-memory", "model-config", "model-repository", "trace", "logging")

# Failures that may pass.
TRANSIENT_MARKER = "[segserve:transient]"
# Triton's own wording of failures that pass, with the version each was checked on.
TRITON_TRANSIENT_PHRASES = {
    "no available versions": "2.51",  # model being unloaded or reloaded
    "is not healthy": "2.51",  # a Python-backend stub died ("Stub process ... is not healthy")
    "Unable to find shared memory region": "2.51",  # a restarted server forgot the client's regions
    # A BLS call of a frame in flight while a server with requests stuck in a dead stub is
    # restarted (seen with scripts/recovery_time.py --kill in-flight; not reproduced by a plain
    # SIGINT, where Triton lets in-flight frames finish).
    "Server not ready": "2.51",
}
def looks_channels_last(shape) -> bool:
    """True for the shape of an image with its channels last, as numpy, PIL and imageio hold
    pictures (``[H, W, C]``, ``[D, H, W, C]``): a last axis of at most 4, every other longer. Taken
    as ``[C, H, W]`` or as a stack, it would be H channels or frames W pixels by C."""
    return len(shape) >= 3 and shape[-1] <= 4 and min(shape[:-1]) > 4


TRITON_RESTRICTED_PHRASE = "is restricted"  # 2.51: "This protocol is restricted, expecting header ..."


def transient_message(message: str) -> str:
    """``message`` marked as a failure that may pass."""
    return message if message.startswith(TRANSIENT_MARKER) else f"{TRANSIENT_MARKER} {message}"


def is_transient_message(message: str) -> bool:
    """True for a message the server marked, or Triton's wording of a failure that passes."""
    return TRANSIENT_MARKER in message or any(phrase in message for phrase in TRITON_TRANSIENT_PHRASES)


def header_name(protocol: str) -> str:
    """The header Triton checks for the token: its gRPC restrictions prefix the key."""
    return f"{GRPC_HEADER_PREFIX}{TOKEN_HEADER}" if protocol == "grpc" else TOKEN_HEADER


def token_headers(token: str | None, protocol: str) -> dict[str, str]:
    return {header_name(protocol): token} if token else {}


def default_token_file() -> pathlib.Path:
    configured = os.environ.get(TOKEN_FILE_ENV)
    return pathlib.Path(configured) if configured else pathlib.Path.home() / ".config" / "segserve" / "token"


def new_token() -> str:
    """A random token (24 bytes, URL-safe letters) that does not begin with "-": one that did
    (1 in 64) was taken for an option when given as ``--token TOKEN``, and the command refused."""
    token = secrets.token_urlsafe(24)
    while token.startswith("-"):
        token = secrets.token_urlsafe(24)
    return token


def token_in_file(path: pathlib.Path | None = None) -> str | None:
    """The token a server wrote to ``path`` (default: the token file), or None: no file, or one
    that holds no token (empty, several words)."""
    try:
        token = (path or default_token_file()).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token if is_token(token) else None


TOKEN_LETTERS = "letters, digits and . _ ~ -"


def is_token(text: str) -> bool:
    """Whether ``text`` may be a token: of ``TOKEN_LETTERS`` only (new_token's, and the
    container entrypoint's rule). It goes into Triton's restriction rule, where ",", ":" or
    "=" would break it; the same rule for ``serve --token`` and the token file, so a second
    server shares any token a first one took (one of other letters was replaced)."""
    return re.fullmatch(r"[A-Za-z0-9._~-]+", text) is not None


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
