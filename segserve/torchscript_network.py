"""A network exported as TorchScript (``model.ts``): the network engine on a GPU where
onnxruntime has no CUDA provider (the CPU-only onnxruntime wheel), and for 2D networks on the
CPU (segserve.backend.onnx_runner)."""

from __future__ import annotations

import pathlib

import torch


def disable_tf32() -> None:
    """Full fp32 convolutions and matmuls on the GPU (old and, where present, new torch switches)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
    matmul = getattr(torch.backends.cuda, "matmul", None)
    if matmul is not None and hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "ieee"


class TorchScriptNetwork:
    """Callable ``[B, C, *tile]`` float32 -> ``[B, K, *tile]`` float32 on the input's device.

    TF32 is switched off and so is TorchScript's kernel fusion: the pipeline promises the
    probabilities of the network as exported within 1e-4.
    """

    def __init__(self, model_path: str | pathlib.Path, device: torch.device):
        disable_tf32()
        self.device = device
        self.module = torch.jit.load(str(model_path), map_location=device).eval()
        if device.type == "cpu":
            # Weights as constants: 19 vs 21 ms per batch of eight 128² tiles, the logits
            # bit for bit those of eager torch (measured). The GPU keeps the module as traced.
            self.module = torch.jit.freeze(self.module)
        self.providers = [f"TorchScript on {device}"]

    @torch.no_grad()  # not inference_mode: MONAI's sliding window updates the outputs in place
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        # No JIT graph optimisation: after its profiling runs TorchScript fuses kernels, which
        # moves this network's probabilities by ~1e-4 from the first calls and from eager torch.
        with torch.jit.optimized_execution(False):
            logits = self.module(tiles.to(self.device, torch.float32))
        return logits.to(tiles.device)
