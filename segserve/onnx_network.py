"""An exported ONNX network run with onnxruntime on torch tensors.

With onnxruntime's CUDA provider and tiles on the GPU, inputs and outputs are bound to device
memory (IOBinding: no host copy). Otherwise the network runs on the CPU and GPU tiles, if any,
are copied to the host and the logits back.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnxruntime as ort
import torch


def cuda_provider_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxNetwork:
    """Callable ``[B, C, *tile]`` float32 -> ``[B, K, *tile]`` float32 on the input's device.

    Args:
        model_path: the ``.onnx`` file.
        intra_op_threads: onnxruntime threads per run; 0 lets onnxruntime choose.
        spin_wait: let idle onnxruntime threads spin (onnxruntime's default) instead of sleeping;
            on in the server's network model (its own process), off in-process.
        use_cuda: run on the GPU through the CUDA provider when it and a GPU are present.
        device_id: that GPU; tiles elsewhere are moved to it and the logits back.
    """

    def __init__(self, model_path: str | pathlib.Path, intra_op_threads: int = 0, use_cuda: bool = True,
                 spin_wait: bool = False, device_id: int = 0):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # In one process with MONAI's blending, spinning worker threads starve the blending that
        # runs between tile batches; alone in a server stub they pay (docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        self.on_gpu = use_cuda and cuda_provider_available() and torch.cuda.is_available()
        self.device = torch.device("cuda", device_id) if self.on_gpu else torch.device("cpu")
        cuda = ("CUDAExecutionProvider", {"device_id": device_id})
        providers = [cuda, "CPUExecutionProvider"] if self.on_gpu else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.num_classes = self.session.get_outputs()[0].shape[1]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.on_gpu and tiles.is_cuda:
            return self._run_on_gpu(tiles)
        host_tiles = tiles.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: host_tiles})
        return torch.from_numpy(logits).to(tiles.device)

    def _run_on_gpu(self, tiles: torch.Tensor) -> torch.Tensor:
        source_device = tiles.device
        tiles = tiles.to(self.device, torch.float32).contiguous()
        logits = torch.empty((tiles.shape[0], self.num_classes, *tiles.shape[2:]), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index, np.float32, list(tiles.shape), tiles.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.device.index, np.float32, list(logits.shape), logits.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return logits.to(source_device)
