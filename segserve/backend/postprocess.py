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

from segserve.backend.tensors import to_triton
from segserve.postprocess import postprocess


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
    The probabilities are written over the logits (no second full-size tensor)."""
    empty_probabilities = logits.new_empty((0, *logits.shape[1:]))
    result = postprocess(logits, options.probabilities, options.keep_largest, options.contour, overwrite_logits=True)
    empty_contour = result.mask.new_empty((0, *result.mask.shape[1:]))
    return [
        to_triton("MASK", result.mask),
        to_triton("PROBABILITIES", result.probabilities if result.probabilities is not None else empty_probabilities),
        to_triton("CONTOUR", result.contour if result.contour is not None else empty_contour),
    ]
