"""Command-line options shared by ``segment``, ``segment-volume`` and ``segment-dataset``, and
the connection they open from them."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

from tqdm import tqdm

from client import outage_notices
from client.api import SegmentationClient
from client.connection import SegmentationError
from client.results import NetworkInfo
from client.stream import DEFAULT_PATIENCE_S
from client.transports import TRANSPORTS
from segproto import BLEND_MODES, DEFAULT_BLEND, DEFAULT_OVERLAP

T = TypeVar("T")


def add_server_options(parser: argparse.ArgumentParser, default_model: str, default_inflight: int, unit: str,
                       item: str | None = None) -> None:
    """``unit``: what is in flight (plural); ``item``: what is retried (default: ``unit`` less its s)."""
    item = item or unit[:-1]
    parser.set_defaults(retried_item=item)  # what the outage notices say is tried again
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
                        help=f"seconds the servers may keep failing for a passing reason (restarting, busy, connection "
                             f"lost) while failed {item}s are tried again, for the whole run: from the first such failure "
                             f"after the last success (any success resets it); once spent, each further {item} is tried "
                             "once. Also how long a command started while the server loads its model waits "
                             "(default: %(default)s)")
    parser.add_argument("--retries", type=int, help=f"at most this many further attempts per {item} "
                        "(default: as many as --patience allows)")
    parser.add_argument("--model", default=default_model, help="pipeline model (default: %(default)s)")
    parser.add_argument("--network", help="network model to run (default: the server's default network)")
    parser.add_argument("--timeout", type=float, help="seconds before a request is abandoned and retried (default: none)")


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlap", type=float, help=f"tile overlap fraction in [0, 1) (server default {DEFAULT_OVERLAP})")
    parser.add_argument("--blend", choices=BLEND_MODES, help=f"tile blending (server default {DEFAULT_BLEND})")
    parser.add_argument("--sw-batch-size", type=int, help="tiles per network batch (server default 8)")
    parser.add_argument("--intensity-min", type=float, help="fixed intensity mapped to 0 (with --intensity-max)")
    parser.add_argument("--intensity-max", type=float,
                        help="fixed intensity mapped to 1 (default: the 1st..99th percentile of each frame or volume, "
                        "its min..max where those are equal)")
    parser.add_argument("--keep-largest", action="store_true", help="keep only the largest object of each class")
    parser.add_argument("--probabilities", action="store_true", help="also write class probabilities [K, ...]")
    parser.add_argument("--contour", action="store_true", help="also write object borders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")


def segment_options(args: argparse.Namespace) -> dict:
    return dict(probabilities=args.probabilities, contour=args.contour, keep_largest=args.keep_largest or None,
                overlap=args.overlap, blend=args.blend, sw_batch_size=args.sw_batch_size,
                intensity_min=args.intensity_min, intensity_max=args.intensity_max)


def ride_out(ask: Callable[[float], T], what: str, where: str, patience_s: float) -> T:
    """``ask(patience_s)``: asked once; after a passing failure (the model being loaded or
    reloaded: "no available versions") said once on stderr, then asked again with the
    command's patience and readiness watch. Failures that do not pass raise at once."""
    try:
        return ask(0.0)
    except SegmentationError as error:
        if not error.retryable or patience_s <= 0:
            raise
        print(f"client: {what} is not available yet at {where} ({error}); waiting up to {patience_s:g} s (--patience)",
              file=sys.stderr)
    try:
        return ask(patience_s)
    except SegmentationError as error:
        raise SegmentationError(f"{error} (still after waiting {patience_s:g} s)") from None


def check_servers(client, model: str, patience_s: float = 0.0) -> None:
    """Refuse at once when no server answers, or when they answer that ``model`` is unknown.
    While servers answer but none has the model available (loading, or reloading after a stub
    died), wait up to ``patience_s`` seconds (``ride_out``). Then warn about the servers still
    without it (the stream sends them nothing until they answer)."""
    unready = client.unready_servers()
    if len(unready) == len(client.urls):
        where = ", ".join(client.urls)
        if not client.live_servers():
            protocol = "HTTP" if client.protocol == "http" else "gRPC"
            raise SegmentationError(f"model {model!r} is not ready at {where} (is the server running? `make serve`; is "
                                    f"that its {protocol} port? `serve` prints each endpoint's, by default gRPC 8001 "
                                    "for --transport grpc and shm, HTTP 8000 for --transport http)")
        ride_out(client.spatial_dims, f"model {model!r}", where, patience_s)
        unready = client.unready_servers()
    for url in unready:
        print(f"client: warning: model {model!r} is not ready at {url}; using the other server(s)", file=sys.stderr)


def network_info(client, patience_s: float = 0.0):
    """The network the command's requests run (``client.network_info``), a reload ridden out."""
    return ride_out(client.network_info, "the network", ", ".join(client.urls), patience_s)


@contextlib.contextmanager
def connected_client(args: argparse.Namespace,
                     transport: str | None = None) -> Iterator[tuple[SegmentationClient, NetworkInfo]]:
    """A client of the servers the command's options name, once they answer (``check_servers``),
    and the network its requests run; while the command runs, an outage of its servers is told
    of (``client.outage_notices``). ``transport``: instead of ``--transport`` (None: that one;
    refused at once where it cannot work here, e.g. cuda-shm without a GPU)."""
    with SegmentationClient(args.url, transport=transport or args.transport, model=args.model, network=args.network,
                            timeout_s=args.timeout, token=args.token) as client:
        check_servers(client, args.model, args.patience)
        if client.stale_regions_removed:
            print(f"client: removed {len(client.stale_regions_removed)} shared-memory region(s) left by an earlier "
                  "run that did not exit cleanly", file=sys.stderr)
        info = network_info(client, args.patience)
        with outage_notices.watching(client.outage, ", ".join(client.urls), args.patience, say_above_progress,
                                     retries=args.retries, item=args.retried_item):
            yield client, info


def say_above_progress(text: str) -> None:
    """A line on stderr above the progress bar, which is drawn again below it."""
    tqdm.write(text, file=sys.stderr)
