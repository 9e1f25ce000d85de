"""Conversions between Triton Python-backend tensors and torch, through DLPack (CPU or GPU)."""

from __future__ import annotations

import functools
import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from segproto import is_transient_message, transient_message
from segserve.backend.allocator import LARGE_TENSOR_BYTES, discard_backend_copy, discard_pages
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
    """Zero-copy Triton tensor named ``name`` from a torch tensor (made contiguous), for a BLS
    request's inputs."""
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor.contiguous()))


def output_tensor(name: str, tensor: torch.Tensor) -> "pb_utils.Tensor":
    """A response's output ``name`` from a torch tensor of any shape and dtype (made
    contiguous), through DLPack.

    For a CPU tensor the Python backend (2.51 up to at least 25.07, ``pb_tensor.cc``) also
    makes a numpy copy of the whole buffer, which it never sends (pybind11 copies an array
    given without a base; in 2.51 its content is even wrong: pybind11 2.10 misreads NumPy 2's
    item size). A large copy's pages are discarded at once (docs/benchmarks.md, peak memory).
    The numpy route (``pb_utils.Tensor(name, array)``) would avoid the copy, but in 2.51 with
    NumPy 2 it sends 0 bytes.
    """
    tensor = tensor.contiguous()
    triton_tensor = pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor))
    if has_backend_copy(tensor):
        discard_backend_copy(triton_tensor.as_numpy(), tensor)
    return triton_tensor


def has_backend_copy(tensor: torch.Tensor) -> bool:
    """Whether the backend keeps a numpy copy of ``tensor`` (CPU; numpy has no bfloat16)."""
    return not tensor.is_cuda and tensor.dtype != torch.bfloat16


# No repository holds a model of this name: a BLS request to it fails at once, after the
# backend has moved the request's inputs into its shared memory (``output_in_shared_memory``).
PLACEMENT_ONLY_MODEL = "segserve-shared-memory-placement"


def output_in_shared_memory(name: str, tensor: torch.Tensor) -> tuple["pb_utils.Tensor", torch.Tensor]:
    """Output ``name`` with ``tensor``'s values (any shape and dtype), moved into the Python
    backend's shared memory now, and a torch view of that memory (same shape and dtype) for
    the caller to finish the values in (e.g. the softmax of logits). ``tensor``'s own pages
    are then given back: the caller must not read it again.

    Why: the backend copies an output into its shared memory only when the step returns, and
    frees the step's buffer only after the server has copied the output on into the response,
    so a large output existed three times at once (step, shared memory, response: 2.25 GiB
    for an 8192² frame's PROBABILITIES). Moved now, it exists twice. The backend moves a BLS
    request's inputs into shared memory when the request is sent, and an output that is
    already there is sent from there (2.51, ``pb_tensor.cc``, ``infer_request.cc``); the
    request goes to a model no repository holds, so it ends there.

    Where the backend did not move the tensor (a GPU tensor, a small one, another backend
    version), the output is the usual one and the view is ``tensor`` itself.
    """
    tensor = tensor.contiguous()
    output = output_tensor(name, tensor)
    if not has_backend_copy(tensor) or tensor.nbytes < LARGE_TENSOR_BYTES:
        return output, tensor
    try:
        placement = pb_utils.InferenceRequest(model_name=PLACEMENT_ONLY_MODEL, requested_output_names=[],
                                              inputs=[output]).exec()
        ended_as_expected = placement.has_error()
    except pb_utils.TritonModelException:
        ended_as_expected = False
    view = to_torch(output)
    moved = ended_as_expected and view.data_ptr() != tensor.data_ptr()
    log_placement_once(moved)
    if not moved:
        # A fresh output: had the request run somewhere, ``output`` would hold the values
        # as they were then, not the caller's finished ones.
        return output_tensor(name, tensor), tensor
    discard_pages(tensor.data_ptr(), tensor.nbytes)
    return output, view


@functools.cache
def log_placement_once(moved: bool) -> None:
    """Say once per stub whether large outputs go into shared memory early (``moved``)."""
    if moved:
        pb_utils.Logger.log_info("large outputs are moved into the Python backend's shared memory before the response")
    else:
        pb_utils.Logger.log_warn("this Python backend did not move a BLS input into its shared memory: large outputs "
                                 "are sent the usual way, with one more full-size copy at once (docs/benchmarks.md)")


def input_tensor(request, name: str) -> torch.Tensor | None:
    """The request's input ``name`` as torch (a view of the backend's shared memory), or None
    when the optional input is absent. The numpy copy the backend made of a large CPU input
    (as of an output: ``output_tensor``) is discarded."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    view = to_torch(tensor)
    if has_backend_copy(view):
        discard_backend_copy(tensor.as_numpy(), view)
    return view


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
