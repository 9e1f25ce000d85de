"""``make bench``: end-to-end time of a frame through the server vs MONAI in-process, as a
ratio from one run, and the server's peak memory for a large frame.

    python -m scripts.bench_2d [--size 2048] [--repeats 5] [--large-size 8192]

(a) in-process: normalisation, MONAI ``sliding_window_inference`` on the same network, argmax,
    with the torch model and with onnxruntime; the faster of the two is the reference.
(b) server: ``segment_2d`` over gRPC, frame sent as uint16, MASK returned; one server per
    ``--allocators`` entry (e.g. ``glibc,tcmalloc``), all running at once.
(c) client-side tiling: the sliding window in the client, one gRPC request per tile batch to
    the network model (how MONAI Deploy's Triton integration works).
Runs alternate (a)/(b) so machine noise hits both alike; medians are reported.
Cold start: the first request a fresh server answers (the first server's; its warm-up ran
before it reported ready) against the median of the timed ones.
(d) the same server path with preprocessing as its own step (a 2D-only server whose
    segment_2d hands a float32 frame from preprocess_2d to the sliding window: the layout
    before the fusion, less its postprocess step).
Per-step breakdown: Triton's statistics per model for (b) and (d), with the network calls
(BLS) per frame.
Memory: proportional set size (PSS, shared pages split between processes) of tritonserver
and its stub processes: idle on the fresh server; for one large frame with MASK only, with
PROBABILITIES too over gRPC, over HTTP and with the outputs in system shared memory, each on a
fresh 2D-only server,
the peak sampled every 0.5 s during the request minus the PSS just before it, and what the
server keeps after it (allocator caches, Python-backend shared memory).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import platform
import statistics
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

from client.api import SegmentationClient
from export.network_export import build_network, settings_from_spec
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer, copy_models
from segserve.onnx_network import OnnxNetwork
from segserve.reference import reference_logits
from segserve.postprocess import class_mask
from training.synthetic import synthetic_slice, to_detector_counts

CHECKPOINT = REPO_ROOT / "training" / "checkpoints" / "unet2d_particles"
ONNX = REPO_ROOT / "model_repository" / "unet2d_particles" / "1" / "model.onnx"


SPLIT_PREPROCESS_CONFIG = """name: "preprocess_2d"
backend: "python"
max_batch_size: 0
input [
  { name: "IMAGE" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] optional: true },
  { name: "IMAGE_UINT8" data_type: TYPE_UINT8 dims: [ -1, -1, -1 ] optional: true },
  { name: "IMAGE_UINT16" data_type: TYPE_UINT16 dims: [ -1, -1, -1 ] optional: true },
  { name: "IMAGE_INT16" data_type: TYPE_INT16 dims: [ -1, -1, -1 ] optional: true }
]
output [ { name: "NORMALIZED" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "spatial_dims" value: { string_value: "2" } }
parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }
"""


SPLIT_ENSEMBLE_CONFIG = """name: "segment_2d"
platform: "ensemble"
max_batch_size: 0
input [
  { name: "IMAGE" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] optional: true },
  { name: "IMAGE_UINT8" data_type: TYPE_UINT8 dims: [ -1, -1, -1 ] optional: true },
  { name: "IMAGE_UINT16" data_type: TYPE_UINT16 dims: [ -1, -1, -1 ] optional: true },
  { name: "IMAGE_INT16" data_type: TYPE_INT16 dims: [ -1, -1, -1 ] optional: true }
]
output [
  { name: "MASK" data_type: TYPE_UINT8 dims: [ -1, -1 ] },
  { name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] },
  { name: "CONTOUR" data_type: TYPE_UINT8 dims: [ -1, -1 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "preprocess_2d"
      model_version: -1
      input_map { key: "IMAGE" value: "IMAGE" }
      input_map { key: "IMAGE_UINT8" value: "IMAGE_UINT8" }
      input_map { key: "IMAGE_UINT16" value: "IMAGE_UINT16" }
      input_map { key: "IMAGE_INT16" value: "IMAGE_INT16" }
      output_map { key: "NORMALIZED" value: "normalized" }
    },
    {
      model_name: "sliding_window_2d"
      model_version: -1
      input_map { key: "NORMALIZED" value: "normalized" }
      output_map { key: "MASK" value: "MASK" }
      output_map { key: "PROBABILITIES" value: "PROBABILITIES" }
      output_map { key: "CONTOUR" value: "CONTOUR" }
    }
  ]
}
"""


def split_preprocess_repository(destination: pathlib.Path) -> pathlib.Path:
    """A 2D-only repository whose segment_2d is an ensemble: preprocessing as its own step
    (preprocess_2d, two instances) hands the float32 frame (NORMALIZED) to the shipped
    segment_2d model, renamed sliding_window_2d: the layout before the fusion, less the
    separate postprocess step."""
    repository = copy_models(destination, ("segment_2d", "unet2d_particles"))
    (repository / "segment_2d").rename(repository / "sliding_window_2d")
    sliding_window = repository / "sliding_window_2d" / "config.pbtxt"
    text = sliding_window.read_text().replace('name: "segment_2d"', 'name: "sliding_window_2d"')
    image_int16 = '  { name: "IMAGE_INT16" data_type: TYPE_INT16 dims: [ -1, -1, -1 ] optional: true }'
    sliding_window.write_text(text.replace(image_int16, image_int16 + ',\n  { name: "NORMALIZED" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] optional: true }'))
    (repository / "preprocess_2d" / "1").mkdir(parents=True)
    (repository / "preprocess_2d" / "1" / "model.py").write_text("from segserve.backend.preprocess import TritonPythonModel  # noqa: F401\n")
    (repository / "preprocess_2d" / "config.pbtxt").write_text(SPLIT_PREPROCESS_CONFIG)
    (repository / "segment_2d" / "1").mkdir(parents=True)
    (repository / "segment_2d" / "config.pbtxt").write_text(SPLIT_ENSEMBLE_CONFIG)
    return repository


def machine_description() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}"


def write_report(lines: list[str], path: pathlib.Path) -> None:
    """Print a markdown report and keep it at ``path``."""
    report = "\n".join(lines)
    path.write_text(report + "\n")
    print(report)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def pss_by_process(root: psutil.Process) -> dict[str, int]:
    """PSS in bytes of ``root`` and its descendants, keyed ``name:pid``."""
    sizes = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            sizes[f"{process.name()}:{process.pid}"] = process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sizes


def process_tree_pss(root: psutil.Process) -> int:
    """PSS in bytes of ``root`` and its descendants together."""
    return sum(pss_by_process(root).values())


def sampled_during(measure, work, interval_s: float) -> list[tuple[float, object]]:
    """``(seconds since start, measure())`` every ``interval_s`` while ``work()`` runs (reading
    PSS, smaps, costs CPU: slower sampling disturbs less)."""
    samples, done = [], threading.Event()

    def sample():
        start = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - start, measure()))
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return samples


def peak_memory_during(server: TritonServer, work) -> tuple[int, int]:
    """(idle PSS, peak PSS) in bytes of the server's process tree while ``work()`` runs."""
    root = psutil.Process(server.process.pid)
    idle = process_tree_pss(root)
    samples = sampled_during(lambda: process_tree_pss(root), work, 0.5)
    return idle, max([idle, *(pss for _, pss in samples)])


def in_process_mask(frame: np.ndarray, network, tile: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """What a user's own script does: normalise, MONAI sliding window (the pipeline's defaults:
    overlap 0.25, gaussian, 8 tiles per batch), argmax, mask on the host."""
    return class_mask(reference_logits(frame, network, tile, device=device)).cpu()


def stage_breakdown(server: TritonServer, end_to_end_s: float) -> list[str]:
    """Mean time per request in each model (queue + compute), from Triton's statistics API, and
    what remains of the client's median end-to-end time: transport and client work."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as statistics_client:
        model_statistics = statistics_client.get_inference_statistics(as_json=True)["model_stats"]
    rows, pipeline_s = [], None
    for model in model_statistics:
        stats, count = model["inference_stats"], int(model["inference_stats"]["success"].get("count", 0))
        if count:
            seconds = {key: int(stats[key].get("ns", 0)) / 1e9 / count for key in ("queue", "compute_input", "compute_infer", "compute_output")}
            rows.append(f"| {model['name']} | {count} | {int(model.get('execution_count', 0))} | "
                        + " | ".join(f"{value * 1e3:.1f}" for value in seconds.values()) + " |")
            if model["name"] == "segment_2d":
                pipeline_s = sum(seconds.values())
    table = ["| model | requests | executions | queue ms | input ms | infer ms | output ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]
    if pipeline_s is not None:
        table += ["", f"transport and client: {max(end_to_end_s - pipeline_s, 0) * 1e3:.0f} ms of the {end_to_end_s * 1e3:.0f} ms "
                  "median end to end (median minus segment_2d's mean time; approximate)"]
    return table


def network_requests(server: TritonServer, network: str = "unet2d_particles") -> int:
    """Requests the network model has answered (BLS calls, direct calls and warm-up batches)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as statistics_client:
        statistics = statistics_client.get_inference_statistics(network, as_json=True)["model_stats"][0]
    return int(statistics["inference_stats"]["success"].get("count", 0))


class RemoteNetwork:
    """Client-side tiling as MONAI Deploy's Triton integration does it: the sliding window runs
    in the client and every tile batch is one gRPC request to the network model."""

    def __init__(self, url: str, model: str = "unet2d_particles"):
        import tritonclient.grpc as grpcclient

        self.grpcclient, self.model = grpcclient, model
        self.client = grpcclient.InferenceServerClient(url)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        batch = tiles.numpy()
        tensor = self.grpcclient.InferInput("INPUT__0", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        response = self.client.infer(self.model, [tensor], outputs=[self.grpcclient.InferRequestedOutput("OUTPUT__0")])
        return torch.from_numpy(response.as_numpy("OUTPUT__0").copy())  # as_numpy is read-only


def load_torch_network() -> torch.nn.Module:
    return build_network(settings_from_spec(CHECKPOINT.with_suffix(".json"), CHECKPOINT.with_suffix(".pt"), "bench"))


SPLIT_PATH = "server gRPC, preprocessing as its own step (2D-only server)"
# The 8192² cases, each on a fresh server so that none inherits another's grown buffers:
# (label, client transport, segment options).
LARGE_FRAME_CASES = (("MASK only", "grpc", {}), ("MASK and PROBABILITIES", "grpc", {"probabilities": True}),
                     ("MASK and PROBABILITIES over HTTP", "http", {"probabilities": True}),
                     ("MASK and PROBABILITIES, outputs in system shared memory", "shm", {"probabilities": True}))


def large_frame_memory(size: int, rng: np.random.Generator, scratch: pathlib.Path) -> list[tuple]:
    """``(label, idle, peak, after, seconds)`` per LARGE_FRAME_CASES entry: one ``size``²
    uint16 frame through a fresh 2D-only server (PSS in bytes, end-to-end seconds)."""
    large, _ = synthetic_slice((size, size), rng)
    large = to_detector_counts(large, np.uint16, rng)
    rows = []
    for number, (label, transport, options) in enumerate(LARGE_FRAME_CASES):
        repository = copy_models(scratch / f"large-{number}", ("segment_2d", "unet2d_particles"))
        config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
        with TritonServer(config, log_path=scratch / f"large-{number}.log") as server, \
                SegmentationClient(server.http_url if transport == "http" else server.grpc_url, transport=transport,
                                   token=server.config.token) as client:
            client.segment(large[:256, :256])  # connections and regions made before the idle reading
            elapsed = []
            idle, peak = peak_memory_during(server, lambda: elapsed.append(timed(lambda: client.segment(large, **options))))
            time.sleep(2)
            rows.append((label, idle, peak, process_tree_pss(psutil.Process(server.process.pid)), elapsed[0]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="frame side for the timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: %(default)s)")
    parser.add_argument("--large-size", type=int, default=8192, help="frame side for peak memory; 0 skips (default: %(default)s)")
    parser.add_argument("--allocators", default="auto", help="server allocators to compare, comma-separated (default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results"), help="default: %(default)s")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image, _ = synthetic_slice((args.size, args.size), rng)
    frame = to_detector_counts(image, np.uint16, rng)[np.newaxis]
    tile = settings_from_spec(CHECKPOINT.with_suffix(".json"), None, "bench").tile
    torch_network, onnx_network = load_torch_network(), OnnxNetwork(ONNX, use_cuda=False)
    paths = {"in-process torch": lambda: in_process_mask(frame, torch_network, tile),
             "in-process onnxruntime": lambda: in_process_mask(frame, onnx_network, tile)}
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False  # as the server's GPU engine (parity bound 1e-4)
        cuda_network = load_torch_network().cuda()
        paths["in-process torch (cuda)"] = lambda: in_process_mask(frame, cuda_network, tile, "cuda")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench_2d_"))
    idle_footprint, cold, breakdowns = None, {}, {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for allocator in args.allocators.split(","):
            config = ServerConfig(http_port=0, grpc_port=0, metrics_port=0, allocator=allocator)
            server = stack.enter_context(TritonServer(config, log_path=args.out / f"server-{allocator}.log"))
            client = stack.enter_context(SegmentationClient(server.grpc_url, token=server.config.token))
            servers[f"server gRPC ({allocator} allocator)"] = server
            paths[f"server gRPC ({allocator} allocator)"] = functools.partial(client.segment, frame)
        first_server = next(iter(servers.values()))
        idle_footprint = process_tree_pss(psutil.Process(first_server.process.pid))
        split_config = ServerConfig(model_repository=split_preprocess_repository(scratch / "split"), http_port=0,
                                    grpc_port=0, metrics_port=0)
        split_server = stack.enter_context(TritonServer(split_config, log_path=args.out / "server-split.log"))
        split_client = stack.enter_context(SegmentationClient(split_server.grpc_url, token=split_server.config.token))
        servers[SPLIT_PATH] = split_server
        paths[SPLIT_PATH] = functools.partial(split_client.segment, frame)
        remote = RemoteNetwork(first_server.grpc_url)
        paths["client-side tiling (gRPC per tile batch)"] = lambda: in_process_mask(frame, remote, tile)
        times = {name: [] for name in paths}
        for name, run in paths.items():
            cold[name] = timed(run)  # warm-up: first calls load lazy state; for a server, its first request
        for _ in range(args.repeats):
            for name, run in paths.items():
                times[name].append(timed(run))
        first_server_path = next(iter(servers))
        for name in (first_server_path, SPLIT_PATH):
            breakdowns[name] = stage_breakdown(servers[name], statistics.median(times[name]))
            calls_before = network_requests(servers[name])
            paths[name]()  # one frame alone: the network calls it makes are its BLS calls
            breakdowns[name] += ["", f"network calls (BLS) per frame: {network_requests(servers[name]) - calls_before}"]
        remote.client.close()
    memory = large_frame_memory(args.large_size, rng, scratch) if args.large_size else []
    shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference_name = min((name for name in medians if name.startswith("in-process")), key=medians.get)
    lines = [f"machine: {machine_description()}",
             f"frame {args.size}x{args.size} uint16, tile {tile}, overlap 0.25, gaussian, sw_batch_size 8, {args.repeats} runs each",
             "", "| path | median s | ratio to best in-process |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {value:.3f} | {value / medians[reference_name]:.3f} |" for name, value in medians.items()]
    lines += ["", "Per-request time in each model (Triton statistics, all requests, warm-up included), the shipped "
              "fused pipeline (after) and preprocessing as its own step (before the fusion, less its postprocess step):"]
    for name, table in breakdowns.items():
        lines += ["", f"{name}:", "", *table]
    steady = medians[first_server_path]
    lines += ["", f"first request to a fresh server (warm-up done before ready): {cold[first_server_path]:.3f} s, "
              f"{cold[first_server_path] / steady:.2f}x the steady median ({steady:.3f} s)"]
    lines += ["", f"idle footprint of the fresh server (PSS of tritonserver and its stubs): {idle_footprint / 2**30:.2f} GiB"]
    for outputs, idle, peak, after, seconds in memory:
        lines += ["", f"{args.large_size}x{args.large_size} uint16 frame, {outputs}, fresh 2D-only server: {seconds:.1f} s "
                  f"end to end; server PSS before {idle / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB "
                  f"(**+{(peak - idle) / 2**30:.2f} GiB**), after {after / 2**30:.2f} GiB (kept +{(after - idle) / 2**30:.2f} GiB)"]
    write_report(lines, args.out / "bench_2d.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
