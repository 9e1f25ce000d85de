"""Bad requests get a clear Triton error naming the problem, and the server keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

GOOD_FRAME = np.random.default_rng(0).random((1, 70, 90), dtype=np.float32)


def infer(grpc, inputs: dict[str, np.ndarray], parameters=None, outputs=("MASK",), model="segment_2d"):
    tensors = []
    for name, array in inputs.items():
        dtype = {np.float32: "FP32", np.uint8: "UINT8", np.uint16: "UINT16", np.int16: "INT16",
                 np.int32: "INT32", np.float64: "FP64"}[array.dtype.type]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
    return grpc.infer(model, tensors, outputs=requested, parameters=parameters or {})


def with_value(value, at=(0, 5, 7)):
    frame = GOOD_FRAME.copy()
    frame[at] = value
    return frame


BAD_REQUESTS = [
    # (id, inputs, parameters, words expected in the error)
    ("rank-2", {"IMAGE": GOOD_FRAME[0]}, None, ["IMAGE", "shape"]),
    ("rank-4", {"IMAGE": GOOD_FRAME[None]}, None, ["IMAGE", "shape"]),
    ("int32-pixels", {"IMAGE": GOOD_FRAME.astype(np.int32)}, None, ["IMAGE", "data-type"]),
    ("float64-pixels", {"IMAGE": GOOD_FRAME.astype(np.float64)}, None, ["IMAGE", "data-type"]),
    ("empty-frame", {"IMAGE": np.zeros((1, 0, 10), np.float32)}, None, ["empty"]),
    ("no-channels", {"IMAGE": np.zeros((0, 10, 10), np.float32)}, None, ["empty"]),
    ("nan-pixel", {"IMAGE": with_value(np.nan)}, None, ["NaN"]),
    ("inf-pixel", {"IMAGE": with_value(np.inf)}, None, ["Inf"]),
    ("two-images", {"IMAGE": GOOD_FRAME, "IMAGE_UINT8": GOOD_FRAME.astype(np.uint8)}, None, ["exactly one"]),
    ("no-image", {}, None, ["exactly one"]),
    ("too-many-channels", {"IMAGE": np.repeat(GOOD_FRAME, 3, axis=0)}, None, ["channel"]),
    ("unknown-blend", {"IMAGE": GOOD_FRAME}, {"blend": "cubic"}, ["blend", "cubic"]),
    ("overlap-1", {"IMAGE": GOOD_FRAME}, {"overlap": 1.0}, ["overlap", "[0, 1)"]),
    ("overlap-negative", {"IMAGE": GOOD_FRAME}, {"overlap": -0.1}, ["overlap"]),
    ("overlap-string", {"IMAGE": GOOD_FRAME}, {"overlap": "lots"}, ["overlap", "number"]),
    ("unknown-parameter", {"IMAGE": GOOD_FRAME}, {"tile": 64}, ["unknown", "tile"]),
    ("sw-batch-zero", {"IMAGE": GOOD_FRAME}, {"sw_batch_size": 0}, ["sw_batch_size"]),
    ("sw-batch-too-big", {"IMAGE": GOOD_FRAME}, {"sw_batch_size": 1000}, ["sw_batch_size", "max batch"]),
    ("intensity-min-only", {"IMAGE": GOOD_FRAME}, {"intensity_min": 0.0}, ["intensity_max"]),
    ("intensity-inverted", {"IMAGE": GOOD_FRAME}, {"intensity_min": 1.0, "intensity_max": 0.0}, ["intensity_min"]),
    ("unknown-network", {"IMAGE": GOOD_FRAME}, {"network": "no_such_net"}, ["no_such_net"]),
    ("probabilities-not-bool", {"IMAGE": GOOD_FRAME}, {"probabilities": "maybe"}, ["probabilities"]),
]


@pytest.mark.parametrize("inputs, parameters, expected_words", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_refused_clearly_and_server_keeps_serving(grpc, inputs, parameters, expected_words):
    with pytest.raises(InferenceServerException) as refused:
        infer(grpc, inputs, parameters)
    message = refused.value.message()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", message
    for word in expected_words:
        assert word.lower() in message.lower(), message
    mask = infer(grpc, {"IMAGE": GOOD_FRAME}).as_numpy("MASK")
    assert mask.shape == GOOD_FRAME.shape[1:]


def test_unknown_output_is_refused(grpc):
    with pytest.raises(InferenceServerException, match="NOT_AN_OUTPUT"):
        infer(grpc, {"IMAGE": GOOD_FRAME}, outputs=("NOT_AN_OUTPUT",))
    assert infer(grpc, {"IMAGE": GOOD_FRAME}).as_numpy("MASK").shape == (70, 90)
