"""The pipeline's outputs from blended logits [K, *spatial]: MASK [*spatial], PROBABILITIES
[K, *spatial], CONTOUR [*spatial]. The sliding-window steps run this code in their own process
(parameter ``postprocess``), so the logits never cross to another one.

What a request asks for is read from its parameters, not from its requested outputs (an
ensemble such as ``segment_2d_uint16`` asks its step for every output it maps): PROBABILITIES
and CONTOUR are computed only when ``probabilities`` / ``contour`` say so (the client sets them
when it requests those outputs); otherwise they are sent empty with shape [0, ...].
"""

from __future__ import annotations

import logging

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import output_in_shared_memory, output_tensor
from segserve.postprocess import postprocess, softmax_in_place


class TritonLogHandler(logging.Handler):
    """Forwards the pipeline package's log records (e.g. the cuCIM fallback) to the server log."""

    def emit(self, record: logging.LogRecord) -> None:
        log = pb_utils.Logger.log_warn if record.levelno >= logging.WARNING else pb_utils.Logger.log_info
        log(self.format(record))


def forward_package_logs() -> None:
    """Route the ``segserve`` package's log records to the server log (once per stub)."""
    package_logger = logging.getLogger("segserve")
    if not any(isinstance(h, TritonLogHandler) for h in package_logger.handlers):
        package_logger.addHandler(TritonLogHandler())
    package_logger.setLevel(logging.INFO)


def segmentation_outputs(logits: torch.Tensor, options) -> list:
    """The pipeline's outputs from ``[K, *spatial]`` float32 blended logits: MASK, and
    PROBABILITIES and CONTOUR when the options ask for them (else empty, shape ``[0, ...]``).

    The logits are used up: the probabilities are computed where they are sent from, the
    backend's shared memory (``output_in_shared_memory``), else over the logits; so no second
    full-size ``[K, *spatial]`` tensor exists in the step."""
    result = postprocess(logits, probabilities=False, keep_largest=options.keep_largest, contour=options.contour)
    if options.probabilities:
        probabilities, values = output_in_shared_memory("PROBABILITIES", logits)
        softmax_in_place(values)
    else:
        probabilities = output_tensor("PROBABILITIES", logits.new_empty((0, *logits.shape[1:])))
    contour = result.contour if result.contour is not None else result.mask.new_empty((0, *result.mask.shape[1:]))
    return [output_tensor("MASK", result.mask), probabilities, output_tensor("CONTOUR", contour)]
