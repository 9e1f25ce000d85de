"""Conversions between Triton Python-backend tensors and torch, through DLPack (CPU or GPU)."""

from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from segproto import is_transient_message, transient_message
from segserve.metrics import METRICS
from segserve.network_spec import NetworkConfigError
from segserve.options import InputError, OptionError

# Errors caused by the request: reported to the client as INVALID_ARG.
REQUEST_ERRORS = (InputError, OptionError, NetworkConfigError)
# Failures that pass: memory short for a moment (other requests hold it).
TRANSIENT_ERRORS = (MemoryError, torch.cuda.OutOfMemoryError)


def to_torch(tensor: "pb_utils.Tensor") -> torch.Tensor:
    """Zero-copy view of a Triton tensor as a torch tensor on the same device."""
    return torch.from_dlpack(tensor.to_dlpack())


def to_triton(name: str, tensor: torch.Tensor) -> "pb_utils.Tensor":
    """Zero-copy Triton tensor named ``name`` from a torch tensor (made contiguous)."""
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor.contiguous()))


def input_tensor(request, name: str) -> torch.Tensor | None:
    """The request's input ``name`` as torch, or None when the optional input is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else to_torch(tensor)


def is_transient(error: Exception) -> bool:
    """Whether ``error`` may pass: memory short, or a BLS call that met a model being reloaded
    or a dead stub (Triton's wording, matched in ``segproto`` only)."""
    return isinstance(error, TRANSIENT_ERRORS) or is_transient_message(str(error))


def error_response(error: Exception) -> "pb_utils.InferenceResponse":
    """Response carrying ``error``: INVALID_ARG for bad requests; UNAVAILABLE and the message
    marked ``segproto.TRANSIENT_MARKER`` for failures that pass (the client retries those
    only); INTERNAL for the rest (a bug: the client does not retry it)."""
    METRICS.refused(error)
    if isinstance(error, REQUEST_ERRORS):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    if is_transient(error):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(transient_message(str(error)), pb_utils.TritonError.UNAVAILABLE))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INTERNAL))


def model_parameters(model_config: dict) -> dict[str, str]:
    """The ``parameters`` block of a model config as plain ``{key: string_value}``."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def parse_model_config(args: dict) -> dict:
    return json.loads(args["model_config"])


def instance_gpu(args: dict) -> int | None:
    """The GPU of a ``KIND_GPU`` model instance (Triton places one per listed GPU), else None."""
    if args.get("model_instance_kind") == "GPU":
        return int(args["model_instance_device_id"])
    return None
