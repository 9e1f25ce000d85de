"""Open file descriptors of a process streaming over HTTP: the measurement behind the HTTP
thread of ``client.connection`` (each stream's workers are new threads; a client per thread
left its gevent hub's epoll and eventfd behind with each of them).

    python -m scripts.probe_http_fds --url 127.0.0.1:8000 --streams 80
"""

from __future__ import annotations

import argparse
import gc
import os

import numpy as np

from client import SegmentationClient


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port of the server (default: %(default)s)")
    parser.add_argument("--streams", type=int, default=80, help="streams of 4 frames, 4 in flight (default: %(default)s)")
    args = parser.parse_args(argv)
    frame = np.random.default_rng(0).integers(0, 4000, (256, 256), dtype=np.uint16)
    client = SegmentationClient(args.url, transport="http")
    list(client.segment_stream([frame] * 4, inflight=4))
    after_one = open_fds()
    for _ in range(args.streams):
        list(client.segment_stream([frame] * 4, inflight=4))
    after_all = open_fds()
    client.close()
    gc.collect()
    print(f"open fds: {after_one} after 1 stream, {after_all} after {args.streams + 1}, {open_fds()} after close()")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
