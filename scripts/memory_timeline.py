"""Where a large frame's memory goes in the server: the PSS of each server process (tritonserver
and each stub), sampled every ``--interval`` s during one request to a fresh 2D-only server.

    python -m scripts.memory_timeline [--size 8192] [--transport grpc|http|shm] [--probabilities]

Prints the growth over idle at the peak, per process, what is kept after, and a timeline of
the growth. ``make bench`` reports the totals; this finds which process holds them and when.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import psutil

from client.api import SegmentationClient
from scripts.bench_2d import pss_by_process, sampled_during, timed
from segserve.launcher import ServerConfig, TritonServer, copy_models
from training.synthetic import synthetic_slice, to_detector_counts

GIB = 2**30


def growth(sizes: dict[str, int], idle: dict[str, int]) -> dict[str, float]:
    return {name: (sizes.get(name, 0) - idle[name]) / GIB for name in idle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="frame side, uint16 (default: %(default)s)")
    parser.add_argument("--transport", choices=("grpc", "http", "shm"), default="grpc")
    parser.add_argument("--probabilities", action="store_true", help="ask for PROBABILITIES too")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default: %(default)s)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    image, _ = synthetic_slice((args.size, args.size), rng)
    frame = to_detector_counts(image, np.uint16, rng)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="memory_timeline_"))
    repository = copy_models(scratch / "repository", ("segment_2d", "unet2d_particles"))
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config, log_path=scratch / "server.log") as server, \
            SegmentationClient(server.http_url if args.transport == "http" else server.grpc_url,
                               transport=args.transport, token=server.config.token) as client:
        client.segment(frame[:256, :256])  # connections and regions made before the idle reading
        root = psutil.Process(server.process.pid)
        idle, elapsed = pss_by_process(root), []
        trace = sampled_during(lambda: pss_by_process(root),
                               lambda: elapsed.append(timed(lambda: client.segment(frame, probabilities=args.probabilities))),
                               args.interval)
        time.sleep(2)
        after = pss_by_process(root)
    peak_s, peak = max(trace, key=lambda sample: sum(sample[1].values()))
    print(f"{args.size}² uint16, {args.transport}, probabilities={args.probabilities}: {elapsed[0]:.1f} s; idle "
          f"{sum(idle.values()) / GIB:.2f} GiB; peak at {peak_s:.1f} s +{sum(growth(peak, idle).values()):.2f} GiB; "
          f"after +{sum(growth(after, idle).values()):.2f} GiB; server log {scratch / 'server.log'}")
    for name in idle:
        print(f"  {name}: idle {idle[name] / GIB:.2f} GiB, at the peak {growth(peak, idle)[name]:+.2f}, "
              f"after {growth(after, idle)[name]:+.2f}")
    print("timeline (growth in GiB: total, then per process in the order above):")
    for seconds, sizes in trace:
        per_process = growth(sizes, idle)
        print(f"  {seconds:6.1f} s  {sum(per_process.values()):+.2f}  " + " ".join(f"{value:+.2f}" for value in per_process.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
