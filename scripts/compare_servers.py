"""A before/after of a server change within one run: the server of another checkout and this
tree's, side by side, against in-process torch, 2048² uint16 frames alternating between the
three (the machine is noisy: only ratios within one run mean anything).

    git worktree add /tmp/before <commit>
    python -m scripts.compare_servers --other /tmp/before [--rounds 8]

The other checkout's server runs its own code (``python -m segserve serve`` started there); the
exported networks (ignored by git) are copied into its repository when it has none.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading

import numpy as np

from client.api import SegmentationClient
from export.network_export import settings_from_spec
from scripts.bench_2d import CHECKPOINT, load_torch_network, machine_description, timed
from segserve.launcher import DEFAULT_REPOSITORY, ServerConfig, TritonServer, free_ports
from segserve.postprocess import class_mask
from segserve.reference import reference_logits
from training.synthetic import synthetic_slice, to_detector_counts

EXPORTED_NETWORKS = ("unet2d_particles", "unet3d_organs")
TOKEN = "compare-servers"


def with_networks(checkout: pathlib.Path) -> pathlib.Path:
    """``checkout`` with this tree's exported networks copied into its repository where missing."""
    for network in EXPORTED_NETWORKS:
        target = checkout / "model_repository" / network
        if not target.exists() and (DEFAULT_REPOSITORY / network).exists():
            shutil.copytree(DEFAULT_REPOSITORY / network, target)
    return checkout


def start_other(checkout: pathlib.Path, log: pathlib.Path) -> tuple[subprocess.Popen, int]:
    """The other checkout's server, ready; returns it and its gRPC port."""
    grpc, http, metrics = free_ports(3)
    command = [sys.executable, "-m", "segserve", "serve", "--grpc-port", str(grpc), "--http-port", str(http),
               "--metrics-port", str(metrics), "--token", TOKEN, "--log-file", str(log)]
    process = subprocess.Popen(command, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("segserve ready"):
            # Its later output is read and dropped: a full pipe would stop the server.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, grpc
    raise SystemExit(f"compare_servers: the server of {checkout} exited with code {process.wait()}; see {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=pathlib.Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=8, help="frames per path (default: %(default)s)")
    parser.add_argument("--size", type=int, default=2048, help="frame side (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.other / "segserve").is_dir():
        parser.error(f"--other {args.other} is not a checkout of this project")
    rng = np.random.default_rng(0)
    image, _ = synthetic_slice((args.size, args.size), rng)
    frame = to_detector_counts(image, np.uint16, rng)[np.newaxis]
    tile = settings_from_spec(CHECKPOINT.with_suffix(".json"), None, "bench").tile
    network = load_torch_network().eval()
    logs = pathlib.Path(tempfile.mkdtemp(prefix="compare_servers_"))
    other, other_grpc = start_other(with_networks(args.other.resolve()), logs / "other.log")
    try:
        config = ServerConfig(http_port=0, grpc_port=0, metrics_port=0)
        with TritonServer(config, log_path=logs / "this.log") as server, \
                SegmentationClient(server.grpc_url, token=server.config.token) as this_client, \
                SegmentationClient(f"127.0.0.1:{other_grpc}", token=TOKEN) as other_client:
            paths = {f"other server ({args.other})": lambda: other_client.segment(frame),
                     "this tree's server": lambda: this_client.segment(frame),
                     "in-process torch": lambda: class_mask(reference_logits(frame, network, tile))}
            for run in paths.values():
                run()  # first calls
            times = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, run in paths.items():
                    times[name].append(timed(run))
    finally:
        other.terminate()
        other.wait(60)
    reference = statistics.median(times["in-process torch"])
    print(f"machine: {machine_description()}; {args.size}x{args.size} uint16, {args.rounds} frames per path, alternating")
    print("| path | median s | ratio to in-process torch | every run, s |\n| --- | ---: | ---: | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / reference:.3f} | {' '.join(f'{v:.2f}' for v in values)} |")
    print(f"server logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
