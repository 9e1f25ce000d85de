"""Costs of `segment-dataset` on this machine: throughput with 1 and 2 servers/workers, Dask's
overhead per task, and bytes read and written per task.

    make bench-dataset            (or: python -m scripts.bench_dataset --frames 48 --size 512)

Starts its own 2D-only servers (copies of the 2D pipeline) on free ports and LocalClusters of
single-threaded worker processes; writes the figures to bench_results/dataset.json. Without a
GPU every server runs the network on the CPU cores the workers share: throughput is CPU-bound
here and says nothing about GPU nodes; the per-task overhead and bytes are what scale.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np

TWO_D_MODELS = ("segment_2d", "unet2d_particles")


def noop(index: int) -> int:
    return index


def dask_overhead_per_task(tasks: int, workers: int) -> float:
    """Seconds per task of scheduling ``tasks`` empty tasks on ``workers`` worker processes."""
    from distributed import Client, LocalCluster, wait

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        wait(client.map(noop, range(50), pure=False))  # warm up
        start = time.perf_counter()
        wait(client.map(noop, range(tasks), pure=False))
        return (time.perf_counter() - start) / tasks


def run_once(input_path: pathlib.Path, out: pathlib.Path, urls: list[str], workers: int, frames_per_task: int) -> dict:
    from distributed import Client, LocalCluster

    from client.__main__ import parse_args
    from client.dataset_cli import run_dataset

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        # Warm the workers' clients (connections, metadata) and the servers on a throw-away run.
        args = parse_args(["segment-dataset", str(input_path), "--out", str(out) + ".warm", "--url", ",".join(urls),
                           "--scheduler", client.scheduler.address, "--frames-per-task", str(frames_per_task),
                           "--no-progress", "--overwrite"])
        run_dataset(args)
        args = parse_args(["segment-dataset", str(input_path), "--out", str(out), "--url", ",".join(urls), "--scheduler",
                           client.scheduler.address, "--frames-per-task", str(frames_per_task), "--no-progress",
                           "--overwrite"])
        code, summary, seconds = run_dataset(args)
    if code:
        raise SystemExit(f"segment-dataset failed: {summary.failed}")
    reports = summary.reports
    frames = sum(r.items for r in reports)
    return {"workers": workers, "servers": len(urls), "frames": frames, "tasks": len(reports), "seconds": seconds,
            "frames_per_s": frames / seconds,
            "task_seconds_mean": float(np.mean([r.seconds for r in reports])),
            "bytes_read_per_task": float(np.mean([r.bytes_read for r in reports])),
            "bytes_written_per_task": float(np.mean([r.bytes_written for r in reports]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (default: %(default)s)")
    parser.add_argument("--frames-per-task", type=int, default=4)
    parser.add_argument("--overhead-tasks", type=int, default=2000)
    parser.add_argument("--url", help="two running servers A,B to use instead of starting 2D-only ones")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results") / "dataset.json")
    args = parser.parse_args(argv)

    import zarr

    from client.auth import new_token
    from segserve.launcher import ServerConfig, TritonServer, copy_models
    from training.synthetic import synthetic_slice, to_detector_counts

    rng = np.random.default_rng(0)
    frames = np.stack([to_detector_counts(synthetic_slice((args.size, args.size), rng)[0], np.uint16, rng)
                       for _ in range(args.frames)])
    results = {"machine": f"{platform.node()}: {os.cpu_count()} cores, no GPU (CPU-bound: servers and workers share "
                          "the cores)", "frame": [args.size, args.size], "dtype": "uint16"}
    with tempfile.TemporaryDirectory() as scratch:
        root = pathlib.Path(scratch)
        input_path = root / "stack.zarr"
        zarr.create_array(input_path, shape=frames.shape, chunks=(1, args.size, args.size), dtype=frames.dtype)[:] = frames
        servers, token = [], new_token()
        try:
            for index in range(0 if args.url else 2):
                repository = copy_models(root / f"server{index}" / "model_repository", TWO_D_MODELS)
                config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                                      token=token)
                servers.append(TritonServer(config, log_path=root / f"server{index}.log").start(timeout_s=600))
            if servers:  # the driver reads the network's configuration: the restricted endpoints' token
                os.environ["SEGSERVE_TOKEN"] = token
            urls = args.url.split(",") if args.url else [s.grpc_url for s in servers]
            runs = [run_once(input_path, root / "one.zarr", urls[:1], 1, args.frames_per_task),
                    run_once(input_path, root / "two.zarr", urls, 2, args.frames_per_task)]
        finally:
            for server in servers:
                server.stop(timeout_s=20)
    results["runs"] = runs
    results["speedup_2_over_1"] = runs[1]["frames_per_s"] / runs[0]["frames_per_s"]
    results["dask_overhead_s_per_task"] = {str(w): dask_overhead_per_task(args.overhead_tasks, w) for w in (1, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
