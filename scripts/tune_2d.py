"""Tuning sweeps behind the defaults, each as ratios within one run (docs/benchmarks.md).

    python -m scripts.tune_2d [--size 2048] [--repeats 3]

1. ``sw_batch_size`` (request parameter): end-to-end latency of one frame through the server.
2. onnxruntime ``intra_op_num_threads`` and spinning: in-process tile batches of 8.
3. ``spin_wait`` of the server's network model: two servers side by side, the second on a copy
   of the repository with spinning off, frames alternating between them.
4. Preprocessing in the sliding-window step (shipped) or as its own step (``--split-only``
   runs just this): two 2D-only servers side by side, one frame at a time and two in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from google.protobuf import text_format

from client.api import SegmentationClient
from segserve.network_spec import read_model_config
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer, copy_models
from scripts.bench_2d import split_preprocess_repository, timed
from segserve.onnx_network import OnnxNetwork
from training.synthetic import synthetic_slice, to_detector_counts

ONNX = REPO_ROOT / "model_repository" / "unet2d_particles" / "1" / "model.onnx"


def median_seconds(function, repeats: int) -> float:
    return statistics.median(timed(function) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="frame side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (default: %(default)s)")
    parser.add_argument("--split-only", action="store_true", help="only the preprocessing-step comparison (4)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    image, _ = synthetic_slice((args.size, args.size), rng)
    frame = to_detector_counts(image, np.uint16, rng)
    if args.split_only:
        print("\n".join(compare_preprocess_step(frame, args.repeats)))
        return 0
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
    lines += ["", *compare_preprocess_step(frame, args.repeats)]
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


def compare_preprocess_step(frame: np.ndarray, repeats: int) -> list[str]:
    """One frame at a time (median s) and two in flight (frames/s), preprocessing inside the
    sliding-window step vs as its own step, two 2D-only servers side by side."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="tune_2d_split_"))
    repositories = {"in the sliding-window step (shipped)": copy_models(scratch / "fused", ("segment_2d", "unet2d_particles")),
                    "its own step": split_preprocess_repository(scratch / "split")}
    lone, throughput = {name: [] for name in repositories}, {name: [] for name in repositories}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, repository in repositories.items():
            config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
            server = stack.enter_context(TritonServer(config, log_path=scratch / f"{repository.parent.name}-{repository.name}.log"))
            clients[name] = [stack.enter_context(SegmentationClient(server.grpc_url)) for _ in range(2)]
            clients[name][0].segment(frame)
        for _ in range(repeats):
            for name, (first, second) in clients.items():
                lone[name].append(timed(lambda: first.segment(frame)))
                start = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda client: [client.segment(frame) for _ in range(2)], (first, second)))
                throughput[name].append(4 / (time.perf_counter() - start))
    shutil.rmtree(scratch, ignore_errors=True)
    lone_medians = {name: statistics.median(values) for name, values in lone.items()}
    rates = {name: statistics.median(values) for name, values in throughput.items()}
    shipped = next(iter(repositories))
    return ["preprocessing: in the sliding-window step or its own step, two 2D-only servers side by side", "",
            "| preprocessing | one frame, median s | ratio | two in flight, frames/s | ratio |", "| --- | ---: | ---: | ---: | ---: |",
            *[f"| {name} | {lone_medians[name]:.3f} | {lone_medians[name] / lone_medians[shipped]:.3f} | {rates[name]:.3f} | "
              f"{rates[name] / rates[shipped]:.3f} |" for name in repositories]]


if __name__ == "__main__":
    sys.exit(main())
