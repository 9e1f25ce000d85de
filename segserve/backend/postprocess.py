"""``postprocess_2d``: LOGITS [K, *spatial] -> MASK [*spatial], PROBABILITIES [K, *spatial],
CONTOUR [*spatial] (``sliding_window_3d`` runs the same code in its own step).

Triton asks a composing model for every output its ensemble maps, whatever the client
requested, so PROBABILITIES and CONTOUR are computed only when the request parameters
``probabilities`` / ``contour`` say so (the client sets them when it requests those outputs);
otherwise they are sent empty with shape [0, ...].
"""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import error_response, input_tensor, to_triton
from segserve.metrics import METRICS
from segserve.options import parse_options
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


def segmentation_outputs(logits, options) -> list:
    """The pipeline's outputs from ``[K, *spatial]`` blended logits: MASK, and PROBABILITIES and
    CONTOUR when the options ask for them (else empty, shape ``[0, ...]``)."""
    result = postprocess(logits, options.probabilities, options.keep_largest, options.contour)
    empty_probabilities = logits.new_empty((0, *logits.shape[1:]))
    empty_contour = result.mask.new_empty((0, *result.mask.shape[1:]))
    return [
        to_triton("MASK", result.mask),
        to_triton("PROBABILITIES", result.probabilities if result.probabilities is not None else empty_probabilities),
        to_triton("CONTOUR", result.contour if result.contour is not None else empty_contour),
    ]


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        forward_package_logs()

    def execute(self, requests):
        return [METRICS.timed(self._execute_one, request) for request in requests]

    def _execute_one(self, request):
        try:
            options = parse_options(request.parameters())
            outputs = segmentation_outputs(input_tensor(request, "LOGITS"), options)
            return pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as error:
            return error_response(error)
