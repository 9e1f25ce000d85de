"""``make soak``: hold the server under load for a while and check it stays healthy.

    python -m scripts.soak [--duration 600] [--concurrency 4]

Workers alternate transports (gRPC, system shared memory), each sending real frames in a loop:
scikit-image's bundled photographs (camera 512x512 uint8, coins 303x384 uint8) and a synthetic
1024x1024 uint16 detector frame. After a warm-up, the server's resident memory (tritonserver
plus its stubs, summed) is sampled every 5 s. Passes when no request failed, memory in the last
window is within 10% of the first (windows of a minute, or a third of a shorter run), and no
shared-memory region of ours is left in /dev/shm or registered. Exit code 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import threading
import time

import numpy as np
import psutil
from skimage import data

from client import SegmentationClient
from client.shared_memory import DEV_SHM, REGION_PREFIX
from scripts.bench_2d import machine_description, write_report
from segserve.launcher import ServerConfig, TritonServer
from training.synthetic import synthetic_slice, to_detector_counts

MAX_GROWTH = 0.10
SAMPLE_INTERVAL_S = 5.0
WARMUP_REQUESTS = 3


def soak_frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    detector = to_detector_counts(synthetic_slice((1024, 1024), rng)[0], np.uint16, rng)
    return [data.camera(), data.coins(), detector]


def tree_rss(pid: int) -> int:
    total = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclasses.dataclass
class WorkerTally:
    transport: str
    latencies: list[float] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


def worker(url: str, token: str | None, tally: WorkerTally, frames, warmed: threading.Barrier, stop: threading.Event) -> None:
    with SegmentationClient(url, transport=tally.transport, token=token) as client:
        for index in range(WARMUP_REQUESTS):
            client.segment(frames[index % len(frames)])
        warmed.wait()
        index = 0
        while not stop.is_set():
            start = time.perf_counter()
            try:
                client.segment(frames[index % len(frames)])
                tally.latencies.append(time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                tally.failures.append(f"{type(error).__name__}: {error}")
            index += 1


def run_soak(url: str, token: str | None, server_pid: int, args: argparse.Namespace) -> tuple[list[str], bool]:
    frames = soak_frames()
    transports = ["grpc", "shm"]
    tallies = [WorkerTally(transports[i % len(transports)]) for i in range(args.concurrency)]
    warmed, stop = threading.Barrier(args.concurrency + 1), threading.Event()
    threads = [threading.Thread(target=worker, args=(url, token, t, frames, warmed, stop), daemon=True) for t in tallies]
    for thread in threads:
        thread.start()
    warmed.wait(timeout=600)
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < args.duration:
        samples.append((elapsed, tree_rss(server_pid)))
        time.sleep(min(SAMPLE_INTERVAL_S, max(0.0, args.duration - elapsed)))
    samples.append((time.monotonic() - start, tree_rss(server_pid)))
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    window = min(60.0, args.duration / 3)
    first = statistics.mean(rss for t, rss in samples if t <= window)
    last = statistics.mean(rss for t, rss in samples if t >= samples[-1][0] - window)
    growth = last / first - 1
    leftover = sorted(p.name for p in DEV_SHM.glob(f"{REGION_PREFIX}_*"))
    lines = [f"machine: {machine_description()}",
             f"soak: {args.duration:.0f} s at concurrency {args.concurrency} ({', '.join(t.transport for t in tallies)}), "
             "frames: camera 512x512 uint8, coins 303x384 uint8, synthetic 1024x1024 uint16", "",
             "| transport | workers | requests | failed | frames/s | p50 s | p95 s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for transport in transports:
        mine = [t for t in tallies if t.transport == transport]
        if not mine:
            continue
        latencies = sorted(x for t in mine for x in t.latencies)
        failed = sum(len(t.failures) for t in mine)
        p50 = latencies[len(latencies) // 2] if latencies else float("nan")
        p95 = latencies[int(len(latencies) * 0.95)] if latencies else float("nan")
        lines.append(f"| {transport} | {len(mine)} | {len(latencies) + failed} | {failed} | {len(latencies) / args.duration:.2f} | "
                     f"{p50:.3f} | {p95:.3f} |")
    failures = [f for t in tallies for f in t.failures]
    lines += ["", f"server RSS (tritonserver + stubs): first {window:.0f} s {first / 2**30:.2f} GiB, last {window:.0f} s "
              f"{last / 2**30:.2f} GiB, growth {growth * 100:+.1f}% (limit {MAX_GROWTH * 100:.0f}%)",
              f"/dev/shm entries of ours left: {len(leftover)}"]
    if failures:
        lines += ["", "failures (first 5):", *[f"- {f}" for f in failures[:5]]]
    passed = not failures and growth < MAX_GROWTH and not leftover
    lines += ["", "PASS" if passed else "FAIL"]
    return lines, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load after warm-up (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="workers, alternating gRPC and shm (default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results"), help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    with TritonServer(ServerConfig(http_port=0, grpc_port=0, metrics_port=0), log_path=args.out / "server-soak.log") as server:
        lines, passed = run_soak(server.grpc_url, server.config.token, server.process.pid, args)
    write_report(lines, args.out / "soak.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
