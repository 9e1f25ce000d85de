"""The token of the server's restricted endpoints (names and lookup live in ``segproto``).

The server restricts ``RESTRICTED_ENDPOINTS`` (shared-memory registration, model configuration
and repository control, tracing, logging) to requests carrying the token in a header:
``segserve-token`` over HTTP, ``triton-grpc-protocol-segserve-token`` over gRPC (Triton
prefixes the key of gRPC restrictions); inference, health, metadata and statistics stay open,
and they are all the client needs to segment. A client finds the token in, by priority: its
``token`` argument, ``$SEGSERVE_TOKEN``, or the token file ``python -m segserve serve`` writes
(``$SEGSERVE_TOKEN_FILE``, default ``~/.config/segserve/token``, readable by its owner only).
"""

from segproto import (GRPC_HEADER_PREFIX, RESTRICTED_ENDPOINTS, TOKEN_ENV, TOKEN_FILE_ENV, TOKEN_HEADER,  # noqa: F401
                      default_token_file, header_name, new_token, resolve_token, token_headers, write_token_file)
