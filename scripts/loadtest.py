"""``make loadtest``: perf_analyzer against the segmentation ensembles with real frames.

    python -m scripts.loadtest [--size 1024] [--concurrency 1,2,4,8] [--url HOST:PORT] [--smoke]

Starts a server (unless --url), writes the input data (a synthetic detector frame, uint16, as
base64 JSON with its shape) and sweeps concurrency for each run:

    grpc           segment_2d over gRPC (its four optional inputs; the frame as IMAGE_UINT16)
    grpc-uint16    segment_2d_uint16 over gRPC
    shm-uint16     segment_2d_uint16 over system shared memory (perf_analyzer cannot send
                   optional inputs through shared memory, hence the one-input ensemble)

Requests carry the contract's parameters (overlap, blend, sw_batch_size). Writes per run and
concurrency perf_analyzer's CSV (``-f --verbose-csv``) and report (with the per-composing-model
breakdown, the BLS-called network included), per run a merged CSV, a summary table
(loadtest.md) and one PNG of throughput vs p95 latency per run.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np

from client.auth import header_name, resolve_token
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer
from training.synthetic import synthetic_slice, to_detector_counts

PERF_ANALYZER = REPO_ROOT / ".tools" / "bin" / "perf_analyzer"
REQUEST_PARAMETERS = ("overlap:0.25:string", "blend:gaussian:string", "sw_batch_size:8:int")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    model: str
    shared_memory: str


RUNS = (Run("grpc", "segment_2d", "none"), Run("grpc-uint16", "segment_2d_uint16", "none"),
        Run("shm-uint16", "segment_2d_uint16", "system"))


def write_input_data(path: pathlib.Path, size: int) -> tuple[int, ...]:
    """A detector-like uint16 frame ``[1, size, size]`` as perf_analyzer JSON; returns its shape."""
    rng = np.random.default_rng(0)
    image, _ = synthetic_slice((size, size), rng)
    frame = to_detector_counts(image, np.uint16, rng)[np.newaxis]
    data = {"data": [{"IMAGE_UINT16": {"b64": base64.b64encode(frame.tobytes()).decode(), "shape": list(frame.shape)}}]}
    path.write_text(json.dumps(data))
    return frame.shape


def perf_analyzer_command(run: Run, url: str, data: pathlib.Path, shape, args: argparse.Namespace,
                          concurrency: int, csv_path: pathlib.Path) -> list[str]:
    command = [str(PERF_ANALYZER), "-m", run.model, "-u", url, "-i", "grpc", "--input-data", str(data),
               "--shape", f"IMAGE_UINT16:{','.join(map(str, shape))}", "--concurrency-range", str(concurrency),
               "--percentile", "95", "--bls-composing-models", "unet2d_particles", "-f", str(csv_path), "--verbose-csv"]
    if args.request_count:
        command += ["--request-count", str(args.request_count)]  # a fixed count: no stability search
    else:
        command += ["-p", str(args.window_ms), "-r", str(args.trials), "-s", "50"]
    for parameter in REQUEST_PARAMETERS:
        command += ["--request-parameter", parameter]
    if args.token:  # shared-memory registration is a restricted endpoint
        command += ["-H", f"{header_name('grpc')}:{args.token}"]
    if run.shared_memory != "none":
        # Largest output: PROBABILITIES when asked for, [3, H, W] float32.
        command += ["--shared-memory", run.shared_memory, "--output-shared-memory-size", str(12 * shape[-1] * shape[-2])]
    return command


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: pathlib.Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(results: dict[str, list[dict[str, str]]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for name, rows in results.items():
        latency = [float(r["p95 latency"]) / 1e3 for r in rows]
        throughput = [float(r["Inferences/Second"]) for r in rows]
        axes.plot(latency, throughput, marker="o", label=name)
        for row, x, y in zip(rows, latency, throughput):
            axes.annotate(row["Concurrency"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("p95 latency (ms)")
    axes.set_ylabel("throughput (frames/s)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary(results: dict[str, list[dict[str, str]]]) -> list[str]:
    lines = ["| run | concurrency | frames/s | p50 ms | p95 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['Concurrency']} | {float(r['Inferences/Second']):.2f} | {float(r['p50 latency']) / 1e3:.0f} | "
                         f"{float(r['p95 latency']) / 1e3:.0f} | {float(r['p99 latency']) / 1e3:.0f} |")
    return lines


def run_all(args: argparse.Namespace, url: str) -> int:
    data = args.out / "input_data.json"
    shape = write_input_data(data, args.size)
    results, failures = {}, 0
    levels = [int(level) for level in args.concurrency.split(",")]
    for run in RUNS:
        if args.runs and run.name not in args.runs.split(","):
            continue
        rows = []
        for concurrency in levels:
            stem = args.out / f"{run.name}-c{concurrency}"
            command = perf_analyzer_command(run, url, data, shape, args, concurrency, stem.with_suffix(".csv"))
            shown = " ".join(command).replace(args.token, "$SEGSERVE_TOKEN") if args.token else " ".join(command)
            print(f"[{run.name} c={concurrency}] {shown}", flush=True)  # the token kept out of CI logs
            completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            stem.with_suffix(".txt").write_text(completed.stdout + completed.stderr)
            if completed.returncode != 0 or not stem.with_suffix(".csv").exists():
                failures += 1
                print(f"[{run.name} c={concurrency}] perf_analyzer failed ({completed.returncode}); see {stem}.txt", file=sys.stderr)
                continue
            rows += read_csv(stem.with_suffix(".csv"))
        if rows:
            results[run.name] = rows
            write_csv(args.out / f"{run.name}.csv", rows)
    if results:
        lines = [f"frame {shape[-1]}x{shape[-2]} uint16, parameters {', '.join(REQUEST_PARAMETERS)}", "", *summary(results)]
        (args.out / "loadtest.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        plot(results, args.out / "loadtest.png", f"segment_2d, {shape[-1]}x{shape[-2]} uint16 frames")
        print(f"CSV, reports and loadtest.png in {args.out}/")
    zero = [name for name, rows in results.items() if not rows or any(float(r["Inferences/Second"]) <= 0 for r in rows)]
    if zero:
        print(f"zero throughput in {', '.join(zero)}", file=sys.stderr)
    return 1 if failures or zero else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="frame side in pixels (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="concurrency levels, comma-separated (default: %(default)s)")
    parser.add_argument("--window-ms", type=int, default=6000, help="measurement window (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=4, help="max windows per concurrency (default: %(default)s)")
    parser.add_argument("--request-count", type=int, default=0, help="measure this many requests instead of stable windows")
    parser.add_argument("--runs", help=f"comma-separated subset of {', '.join(r.name for r in RUNS)}")
    parser.add_argument("--url", help="gRPC address of a running server (default: start one)")
    parser.add_argument("--token", help="token of the restricted endpoints of --url's server (default: $SEGSERVE_TOKEN "
                        "or the token file)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 256x256 frame, concurrency 1, 10 requests per run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per perf_analyzer run (default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results/loadtest"), help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.concurrency, args.request_count = 256, "1", 10
    if not PERF_ANALYZER.exists():
        print(f"loadtest: error: {PERF_ANALYZER} missing: run `make setup`", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.url:
        args.token = resolve_token(args.token)
        return run_all(args, args.url)
    config = ServerConfig(http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config, log_path=args.out / "server.log") as server:
        args.token = server.config.token
        return run_all(args, server.grpc_url)


if __name__ == "__main__":
    sys.exit(main())
