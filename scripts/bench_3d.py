"""``make bench-3d``: end-to-end time of a volume through ``segment_3d`` vs MONAI in-process on
the same network, as a ratio from one run, and the server's peak memory for a large volume.

    python -m scripts.bench_3d [--size 256] [--repeats 3] [--large 512 512 256]

(a) in-process: normalisation, MONAI ``sliding_window_inference`` (overlap 0.25, gaussian,
    8 windows per batch), argmax; torch and onnxruntime, the faster is the reference.
(b) server: ``segment_3d`` over gRPC, the volume sent as int16 Hounsfield units, MASK back;
    the server loads the 3D pipeline alone (a 3D deployment), so its memory is the 3D pipeline's.
Runs alternate so machine noise hits both alike; medians are reported. Peak memory, measured
first on the fresh server: proportional set size (PSS) of tritonserver and its stubs, sampled
during one request for a float32 volume of ``--large`` voxels.
With a GPU, also pre- and postprocessing (normalisation; argmax, keep_largest, contour) of a
512x512x114 CT volume on the GPU vs the CPU, the steps the server runs around the network.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

import numpy as np
import psutil
import torch

from client.api import SegmentationClient
from export.network_export import build_network, settings_from_spec
from scripts.bench_2d import (in_process_mask, machine_description, peak_memory_during, process_tree_pss, timed,
                              write_report)
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer, copy_models
from segserve.onnx_network import OnnxNetwork
from segserve.options import PipelineOptions
from segserve.postprocess import postprocess
from segserve.preprocess import normalize
from training.synthetic_3d import synthetic_volume, to_int16_hu

CHECKPOINT = REPO_ROOT / "training" / "checkpoints" / "unet3d_organs"
ONNX = REPO_ROOT / "model_repository" / "unet3d_organs" / "1" / "model.onnx"
THREE_D_MODELS = ("segment_3d", "unet3d_organs")


def pre_post_seconds(volume: np.ndarray, logits: torch.Tensor, device: str, repeats: int = 3) -> float:
    """Median time of the server's steps around the network on ``device``: normalise the
    volume, then argmax, keep_largest and contour of ``logits``; inputs already on the device."""
    image, logits = torch.from_numpy(volume[None]).to(device), logits.to(device)

    def run():
        normalize(image, PipelineOptions())
        postprocess(logits, keep_largest=True, contour=True)
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    return statistics.median(timed(run) for _ in range(repeats))


def gpu_pre_post_lines(rng) -> list[str]:
    volume = to_int16_hu(synthetic_volume((114, 512, 512), rng)[0])
    logits = torch.randn((3, 114, 512, 512), generator=torch.Generator().manual_seed(0))
    cpu, gpu = pre_post_seconds(volume, logits, "cpu"), pre_post_seconds(volume, logits, "cuda")
    return ["", "Pre/postprocessing of a 512x512x114 int16 volume (normalise; argmax, keep_largest, contour), median of 3:",
            f"CPU {cpu:.2f} s, GPU ({torch.cuda.get_device_name(0)}) {gpu:.3f} s: GPU {cpu / gpu:.1f}x faster"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="cube side for the timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default: %(default)s)")
    parser.add_argument("--large", type=int, nargs=3, default=[256, 512, 512], metavar=("D", "H", "W"),
                        help="float32 volume for peak memory; 0 0 0 skips (default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results"), help="default: %(default)s")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    volume = to_int16_hu(synthetic_volume((args.size,) * 3, rng)[0])
    spec = settings_from_spec(CHECKPOINT.with_suffix(".json"), CHECKPOINT.with_suffix(".pt"), "bench")
    torch_network, onnx_network = build_network(spec), OnnxNetwork(ONNX, use_cuda=False)
    paths = {"in-process torch": lambda: in_process_mask(volume[None], torch_network, spec.tile),
             "in-process onnxruntime": lambda: in_process_mask(volume[None], onnx_network, spec.tile)}
    memory = None
    scratch = tempfile.TemporaryDirectory(prefix="bench-3d-")
    repository = copy_models(pathlib.Path(scratch.name), THREE_D_MODELS)
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with scratch, TritonServer(config, log_path=args.out / "server-3d.log") as server, \
            SegmentationClient(server.grpc_url, model="segment_3d") as client:
        if all(args.large):  # first, on the fresh server: what one large volume needs
            large = synthetic_volume(tuple(args.large), rng)[0]  # float32 HU
            elapsed = []
            idle, peak = peak_memory_during(server, lambda: elapsed.append(timed(lambda: client.segment(large))))
            memory = (idle, peak, elapsed[0], process_tree_pss(psutil.Process(server.process.pid)))
            del large
        paths["server segment_3d gRPC"] = lambda: client.segment(volume)
        times = {name: [] for name in paths}
        for run in paths.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in paths.items():
                times[name].append(timed(run))
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference_name = min((name for name in medians if name.startswith("in-process")), key=medians.get)
    size = f"{args.size}x{args.size}x{args.size}"
    lines = [f"machine: {machine_description()}",
             f"volume {size} int16 HU, tile {spec.tile}, overlap 0.25, gaussian, sw_batch_size 8, {args.repeats} runs each",
             "", "| path | median s | ratio to best in-process |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {value:.2f} | {value / medians[reference_name]:.3f} |" for name, value in medians.items()]
    if memory:
        idle, peak, seconds, after = memory
        shape = "x".join(str(n) for n in reversed(args.large))
        lines += ["", f"{shape} (W x H x D) float32 volume, one request to the fresh 3D server: {seconds:.1f} s end to end; "
                  f"server PSS idle {idle / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB (+{(peak - idle) / 2**30:.2f} GiB), "
                  f"{after / 2**30:.2f} GiB after (pools and allocator caches kept for the next request)"]
    if torch.cuda.is_available():
        lines += gpu_pre_post_lines(rng)
    write_report(lines, args.out / "bench_3d.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
