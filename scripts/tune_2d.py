"""Tuning sweeps behind the defaults, each as ratios within one run (docs/benchmarks.md).

    python -m scripts.tune_2d [--size 2048] [--repeats 3]

1. ``sw_batch_size`` (request parameter): end-to-end latency of one frame through the server.
2. onnxruntime ``intra_op_num_threads`` and spinning: in-process tile batches of 8.
3. ``spin_wait`` of the server's network model: two servers side by side, the second on a copy
   of the repository with spinning off, frames alternating between them.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import statistics
import sys
import tempfile

import numpy as np
import torch

from google.protobuf import text_format

from client.api import SegmentationClient
from segserve.network_spec import read_model_config
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer
from scripts.bench_2d import timed
from segserve.onnx_network import OnnxNetwork
from training.synthetic import synthetic_slice, to_detector_counts

ONNX = REPO_ROOT / "model_repository" / "unet2d_particles" / "1" / "model.onnx"


def median_seconds(function, repeats: int) -> float:
    return statistics.median(timed(function) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="frame side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (default: %(default)s)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    image, _ = synthetic_slice((args.size, args.size), rng)
    frame = to_detector_counts(image, np.uint16, rng)
    lines = [f"sw_batch_size sweep, {args.size}x{args.size} uint16 frame through the server", "",
             "| sw_batch_size | median s | ratio to 8 |", "| ---: | ---: | ---: |"]
    config = ServerConfig(http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config, log_path=pathlib.Path(tempfile.gettempdir()) / "tune_2d_server.log") as server, \
            SegmentationClient(server.grpc_url) as client:
        client.segment(frame)
        results = {size: median_seconds(lambda: client.segment(frame, sw_batch_size=size), args.repeats) for size in (2, 4, 8, 16, 32)}
    lines += [f"| {size} | {seconds:.3f} | {seconds / results[8]:.3f} |" for size, seconds in results.items()]
    tiles = torch.rand(8, 1, 128, 128)
    lines += ["", "onnxruntime, batches of 8 tiles in-process", "", "| threads | spinning | ms per batch | ratio to default |",
              "| ---: | --- | ---: | ---: |"]
    timings = {}
    for threads in (0, 1, 2):
        for spin in (False, True):
            network = OnnxNetwork(ONNX, intra_op_threads=threads, use_cuda=False, spin_wait=spin)
            network(tiles)
            timings[(threads, spin)] = median_seconds(lambda: network(tiles), 10 * args.repeats)
    for (threads, spin), seconds in timings.items():
        lines.append(f"| {threads or 'auto'} | {'yes' if spin else 'no'} | {seconds * 1e3:.1f} | {seconds / timings[(0, False)]:.3f} |")
    lines += ["", *compare_spin_wait(frame, args.repeats + 2)]
    print("\n".join(lines))
    return 0


def compare_spin_wait(frame: np.ndarray, repeats: int) -> list[str]:
    """Median end-to-end seconds with the network model's onnxruntime threads spinning or not."""
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="tune_2d_"))
    repository = log_dir / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository)
    config_path = repository / "unet2d_particles" / "config.pbtxt"
    config = read_model_config(config_path)
    config.parameters["spin_wait"].string_value = "false"
    config_path.write_text(text_format.MessageToString(config))
    times = {"spinning (default)": [], "not spinning": []}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, repo in (("spinning (default)", REPO_ROOT / "model_repository"), ("not spinning", repository)):
            config = ServerConfig(model_repository=repo, http_port=0, grpc_port=0, metrics_port=0)
            server = stack.enter_context(TritonServer(config, log_path=log_dir / f"{name.split()[0]}.log"))
            clients[name] = stack.enter_context(SegmentationClient(server.grpc_url))
            clients[name].segment(frame)
        for _ in range(repeats):
            for name, client in clients.items():
                times[name].append(timed(lambda: client.segment(frame)))
    shutil.rmtree(log_dir, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return ["network model spin_wait, two servers side by side", "", "| network threads | median s | ratio |", "| --- | ---: | ---: |",
            *[f"| {name} | {value:.3f} | {value / medians['spinning (default)']:.3f} |" for name, value in medians.items()]]


if __name__ == "__main__":
    sys.exit(main())
