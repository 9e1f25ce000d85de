"""Network model: runs ``<version>/model.onnx`` (onnxruntime) or its TorchScript twin
``model.ts`` on dynamically batched tiles.

Engine (parameter ``engine``: auto | onnxruntime | torchscript). ``auto``: on a GPU,
onnxruntime through its CUDA provider, or the TorchScript twin ``model.ts`` written by the
export where onnxruntime is the CPU-only build. On the CPU, the engine measured faster for the
network's dimensionality on this project's machine (docs/benchmarks.md): TorchScript for 2D
networks (19 vs 20.5 ms per batch of eight 128² tiles), onnxruntime for 3D (65 vs 86 ms per
four 64³ tiles).

Each request carries ``[b, C, *tile]`` tiles; the requests Triton batched together run as one
``[sum(b), C, *tile]`` call and the logits are split back per request.

The first execution of each batch size is logged with its time: with the export's
``model_warmup`` they happen while the model loads, before the server reports ready.
"""

from __future__ import annotations

import os
import pathlib
import time

# Before torch is imported: libgomp reads its waiting policy once, when torch loads it. This
# stub runs the network alone, so its OpenMP threads keep libgomp's default (spin a moment,
# then sleep) instead of the launcher's PASSIVE for the other steps: TorchScript on the CPU took
# 29-30 ms per batch of eight 128² tiles under PASSIVE, 19 ms with the default.
if os.environ.pop("SEGSERVE_NETWORK_OMP_DEFAULT_WAIT", None):
    os.environ.pop("OMP_WAIT_POLICY", None)

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils

from segserve.backend.log import stamped
from segserve.backend.tensors import (error_response, instance_gpu, model_parameters, output_tensor, parse_model_config,
                                     to_torch)
from segserve.metrics import METRICS
from segserve.onnx_network import OnnxNetwork, cuda_provider_available
from segserve.torchscript_network import TorchScriptNetwork


ENGINES = ("auto", "onnxruntime", "torchscript")


def choose_engine(setting: str, on_gpu: bool, torchscript_path: pathlib.Path, spatial_dims: int) -> str:
    """``onnxruntime`` or ``torchscript`` for the ``engine`` parameter (module docstring)."""
    if setting not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {setting!r}")
    if setting != "auto":
        return setting
    if not torchscript_path.exists():
        return "onnxruntime"
    if on_gpu:
        return "onnxruntime" if cuda_provider_available() else "torchscript"
    return "torchscript" if spatial_dims == 2 else "onnxruntime"


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        config = parse_model_config(args)
        parameters = model_parameters(config)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = pathlib.Path(args["model_repository"]) / args["model_version"]
        use_cuda = parameters.get("use_cuda", "true").lower() == "true"
        on_gpu = use_cuda and torch.cuda.is_available()
        gpu = instance_gpu(args) or 0  # KIND_GPU: this instance's GPU
        spatial_dims = len(config["input"][0]["dims"]) - 1  # [C, *tile]
        engine = choose_engine(parameters.get("engine", "auto"), on_gpu, version_dir / "model.ts", spatial_dims)
        if engine == "torchscript":
            self.network = TorchScriptNetwork(version_dir / "model.ts", torch.device("cuda", gpu) if on_gpu else torch.device("cpu"))
        else:
            self.network = OnnxNetwork(version_dir / "model.onnx", int(parameters.get("intra_op_threads", "0")), use_cuda,
                                       spin_wait=parameters.get("spin_wait", "false").lower() == "true", device_id=gpu)
        self.name = args["model_name"]
        self._batch_sizes_seen: set[int] = set()
        pb_utils.Logger.log_info(f"{self.name}: {engine} engine, {self.network.providers}")

    def finalize(self):
        METRICS.close()

    def execute(self, requests):
        try:
            tiles = [to_torch(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
            batch = torch.cat(tiles) if len(tiles) > 1 else tiles[0]
            start = time.perf_counter()
            logits = METRICS.network_call(self.network, batch)
            self._log_first_of_size(batch.shape[0], time.perf_counter() - start)
        except Exception as error:
            return [error_response(error) for _ in requests]
        sizes = [t.shape[0] for t in tiles]
        return [
            pb_utils.InferenceResponse(output_tensors=[output_tensor(self.output_name, part)])
            for part in torch.split(logits, sizes)
        ]

    def _log_first_of_size(self, batch_size: int, seconds: float) -> None:
        if batch_size not in self._batch_sizes_seen:
            self._batch_sizes_seen.add(batch_size)
            pb_utils.Logger.log_info(stamped(f"{self.name}: first batch of {batch_size} tiles ran in {seconds:.3f} s"))
