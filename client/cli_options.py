"""Command-line options shared by ``segment`` and ``segment-volume``."""

from __future__ import annotations

import argparse
import sys

from client.connection import SegmentationError
from client.stream import DEFAULT_PATIENCE_S
from client.transports import TRANSPORTS


def add_server_options(parser: argparse.ArgumentParser, default_model: str, default_inflight: int, unit: str) -> None:
    parser.add_argument("--url", help="server address host:port (default: 127.0.0.1:8001, or :8000 for http); several "
                        "comma-separated spread the work by fewest requests in flight and fail over between them")
    parser.add_argument("--token", help="token of the server's restricted endpoints, needed for shared memory "
                        "(default: $SEGSERVE_TOKEN, else the file `python -m segserve serve` wrote: ~/.config/segserve/token)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="grpc",
                        help="how data travels: grpc, http, shm (system shared memory, same host) or cuda-shm "
                             "(default: %(default)s)")
    parser.add_argument("--inflight", type=int, default=default_inflight,
                        help=f"{unit} in flight at once (default: %(default)s)")
    parser.add_argument("--patience", type=float, default=DEFAULT_PATIENCE_S,
                        help=f"seconds a {unit[:-1]} that fails for a passing reason (server restarting, busy, "
                             "connection lost) is tried again before it is given up (default: %(default)s)")
    parser.add_argument("--retries", type=int, help=f"at most this many further attempts per {unit[:-1]} "
                        "(default: as many as --patience allows)")
    parser.add_argument("--model", default=default_model, help="pipeline model (default: %(default)s)")
    parser.add_argument("--network", help="network model to run (default: the server's default network)")
    parser.add_argument("--timeout", type=float, help="seconds before a request is abandoned and retried (default: none)")


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlap", type=float, help="tile overlap fraction in [0, 1) (server default 0.25)")
    parser.add_argument("--blend", choices=("gaussian", "constant"), help="tile blending (server default gaussian)")
    parser.add_argument("--sw-batch-size", type=int, help="tiles per network batch (server default 8)")
    parser.add_argument("--intensity-min", type=float, help="fixed intensity mapped to 0 (with --intensity-max)")
    parser.add_argument("--intensity-max", type=float,
                        help="fixed intensity mapped to 1 (default: the 1st..99th percentile of each frame or volume)")
    parser.add_argument("--keep-largest", action="store_true", help="keep only the largest object of each class")
    parser.add_argument("--probabilities", action="store_true", help="also write class probabilities [K, ...]")
    parser.add_argument("--contour", action="store_true", help="also write object borders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")


def segment_options(args: argparse.Namespace) -> dict:
    return dict(probabilities=args.probabilities, contour=args.contour, keep_largest=args.keep_largest or None,
                overlap=args.overlap, blend=args.blend, sw_batch_size=args.sw_batch_size,
                intensity_min=args.intensity_min, intensity_max=args.intensity_max)


def check_servers(client, model: str, patience_s: float = 0.0) -> None:
    """Refuse at once when no server answers, or when they answer that ``model`` is unknown.
    While servers answer but none has the model available (loading, or reloading after a stub
    died: "no available versions"), wait up to ``patience_s`` seconds, saying so once. Then warn
    about the servers still without it (the stream sends them nothing until they answer)."""
    unready = client.unready_servers()
    if len(unready) == len(client.urls):
        where = ", ".join(client.urls)
        if not client.live_servers():
            raise SegmentationError(f"model {model!r} is not ready at {where} (is the server running? `make serve`)")
        try:
            client.spatial_dims()  # one look: an unknown model fails here with the server's words
        except SegmentationError as error:
            if not error.retryable:
                raise
            print(f"client: model {model!r} is not available yet at {where} ({error}); waiting up to "
                  f"{patience_s:g} s (--patience)", file=sys.stderr)
            client.spatial_dims(patience_s)
        unready = client.unready_servers()
    for url in unready:
        print(f"client: warning: model {model!r} is not ready at {url}; using the other server(s)", file=sys.stderr)
