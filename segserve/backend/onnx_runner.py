"""Network model: runs ``<version>/model.onnx`` with onnxruntime on dynamically batched tiles.

Engine: onnxruntime, on the GPU through its CUDA provider when both exist. With a GPU but a
CPU-only onnxruntime, the TorchScript twin ``model.ts`` written by the export runs on the GPU
instead (parameter ``engine``: auto | onnxruntime | torchscript).

Each request carries ``[b, C, *tile]`` tiles; the requests Triton batched together run as one
``[sum(b), C, *tile]`` call and the logits are split back per request.

The first execution of each batch size is logged with its time: with the export's
``model_warmup`` they happen while the model loads, before the server reports ready.
"""

from __future__ import annotations

import pathlib
import time

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.log import stamped
from segserve.backend.tensors import (error_response, instance_gpu, model_parameters, output_tensor, parse_model_config,
                                     to_torch)
from segserve.metrics import METRICS
from segserve.onnx_network import OnnxNetwork, cuda_provider_available
from segserve.torchscript_network import TorchScriptNetwork


def choose_engine(setting: str, use_cuda: bool, torchscript_path: pathlib.Path) -> str:
    """``onnxruntime`` or ``torchscript`` for the ``engine`` parameter on this machine."""
    if setting != "auto":
        return setting
    gpu_without_ort_cuda = use_cuda and torch.cuda.is_available() and not cuda_provider_available()
    return "torchscript" if gpu_without_ort_cuda and torchscript_path.exists() else "onnxruntime"


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        config = parse_model_config(args)
        parameters = model_parameters(config)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = pathlib.Path(args["model_repository"]) / args["model_version"]
        use_cuda = parameters.get("use_cuda", "true").lower() == "true"
        gpu = instance_gpu(args) or 0  # KIND_GPU: this instance's GPU
        engine = choose_engine(parameters.get("engine", "auto"), use_cuda, version_dir / "model.ts")
        if engine == "torchscript":
            self.network = TorchScriptNetwork(version_dir / "model.ts", torch.device("cuda", gpu) if use_cuda else torch.device("cpu"))
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
