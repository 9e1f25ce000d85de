"""``make bench-transport``: end-to-end latency of one frame per transport, and streaming
throughput against requests in flight, all against one running server.

    python -m scripts.bench_transport [--sizes 2048,4096] [--repeats 3] [--stream-frames 200]

Latency: for each frame size and pixel type (uint16, float32), the MASK of one frame through
gRPC, HTTP, system shared memory (and CUDA shared memory on a GPU machine), plus the in-process
reference (normalise, MONAI ``sliding_window_inference``, argmax on the same torch network).
Paths run round-robin, ``--repeats`` times after a warm-up, so machine noise hits all alike;
medians and ratios come from this one run.
Streaming: ``--stream-frames`` uint16 frames of ``--stream-size``² through
``SegmentationClient.segment_stream`` (frames in memory, results kept in memory: the client's
and server's work, not the disk's) for each ``--inflight`` value, over gRPC and shared memory.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

from client.api import SegmentationClient
from client.shared_memory import cuda_available
from export.network_export import settings_from_spec
from scripts.bench_2d import CHECKPOINT, in_process_mask, load_torch_network, machine_description, timed, write_report
from segserve.launcher import ServerConfig, TritonServer
from training.synthetic import synthetic_slice, to_detector_counts


def parse_list(text: str, kind=int) -> list:
    return [kind(part) for part in text.split(",") if part]


def test_frames(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, _ = synthetic_slice((size, size), rng)
    counts = to_detector_counts(image, np.uint16, rng)
    return {"uint16": counts, "float32": counts.astype(np.float32)}


def latency_table(server: TritonServer, args: argparse.Namespace, rng: np.random.Generator) -> list[str]:
    tile = settings_from_spec(CHECKPOINT.with_suffix(".json"), None, "bench").tile
    network = load_torch_network()
    transports = ["grpc", "http", "shm"] + (["cuda-shm"] if cuda_available() else [])
    clients = {t: SegmentationClient(server.http_url if t == "http" else server.grpc_url, transport=t,
                                     token=server.config.token) for t in transports}
    lines = ["| frame | pixels | path | median s | ratio to in-process | ratio to gRPC |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    try:
        for size in args.sizes:
            for dtype, frame in test_frames(size, rng).items():
                paths = {"in-process (torch, CPU)": lambda f=frame: in_process_mask(f[None], network, tile)}
                paths.update({t: (lambda c=clients[t], f=frame: c.segment(f)) for t in transports})
                times = {name: [] for name in paths}
                for run in paths.values():
                    run()  # warm-up: sizes regions, loads lazy state
                for _ in range(args.repeats):
                    for name, run in paths.items():
                        times[name].append(timed(run))
                medians = {name: statistics.median(values) for name, values in times.items()}
                base, grpc = medians["in-process (torch, CPU)"], medians["grpc"]
                for name, value in medians.items():
                    lines.append(f"| {size}x{size} | {dtype} | {name} | {value:.3f} | {value / base:.3f} | {value / grpc:.3f} |")
                print("\n".join(lines[-len(medians):]), flush=True)
    finally:
        for client in clients.values():
            client.close()
    return lines


def stream_table(server: TritonServer, args: argparse.Namespace, rng: np.random.Generator) -> list[str]:
    distinct = [test_frames(args.stream_size, rng)["uint16"] for _ in range(8)]
    frames = [distinct[i % len(distinct)] for i in range(args.stream_frames)]
    lines = ["| transport | inflight | frames/s | ratio to inflight 1 |", "| --- | ---: | ---: | ---: |"]
    for transport in ("grpc", "shm"):
        with SegmentationClient(server.grpc_url, transport=transport, token=server.config.token) as client:
            list(client.segment_stream(frames[: 2 * max(args.inflight)], inflight=max(args.inflight)))  # warm-up
            rates = {}
            for inflight in args.inflight:
                start = time.perf_counter()
                failed = sum(not o.ok for o in client.segment_stream(frames, inflight=inflight))
                rates[inflight] = len(frames) / (time.perf_counter() - start)
                if failed:
                    raise RuntimeError(f"{failed} frames failed over {transport} at inflight {inflight}")
                lines.append(f"| {transport} | {inflight} | {rates[inflight]:.2f} | {rates[inflight] / rates[args.inflight[0]]:.2f} |")
                print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_list, default=[2048, 4096], help="frame sides (default: 2048,4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (default: %(default)s)")
    parser.add_argument("--stream-frames", type=int, default=200, help="frames in the stream; 0 skips (default: %(default)s)")
    parser.add_argument("--stream-size", type=int, default=512, help="side of the stream's frames (default: %(default)s)")
    parser.add_argument("--inflight", type=parse_list, default=[1, 2, 4, 8], help="in-flight values (default: 1,2,4,8)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results"), help="default: %(default)s")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    config = ServerConfig(http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config, log_path=args.out / "server-transport.log") as server:
        lines = [f"machine: {machine_description()}",
                 f"one frame, MASK only, default options; {args.repeats} runs of each path, round-robin", ""]
        lines += latency_table(server, args, rng) if args.sizes else []
        if args.stream_frames:
            lines += ["", f"streaming: {args.stream_frames} uint16 frames of {args.stream_size}x{args.stream_size}, "
                      "SegmentationClient.segment_stream", ""]
            lines += stream_table(server, args, rng)
    write_report(lines, args.out / "bench_transport.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
