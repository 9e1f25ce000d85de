"""Malformed requests get a clear Triton error naming the problem, over gRPC and HTTP, and the
server keeps serving: each case is followed by a good request."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import InferenceServerException

from tests.conftest import GOOD_FRAME, Endpoint

# The test server's segment_2d limit (conftest lowers the shipped 100M to keep the case small).
TEST_MAX_PIXELS = 4096 * 4096
REFUSED_STATUS = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


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
    # An RGB picture [H, W, 3] as numpy reads it, sent as it is: the error says what to send.
    ("channels-last", {"IMAGE": np.ascontiguousarray(np.repeat(GOOD_FRAME, 3, axis=0).transpose(1, 2, 0))}, None,
     ["takes 1 channel(s), IMAGE has 70", "[70, 90, 3] looks like a channels-last [H, W, C] image", "as [H, W]"]),
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
    ("network-of-other-dims", {"IMAGE": GOOD_FRAME}, {"network": "unet3d_organs"},
     ["network 'unet3d_organs' is 3D", "segment_3d", "or segment-volume"]),
    ("probabilities-not-bool", {"IMAGE": GOOD_FRAME}, {"probabilities": "maybe"}, ["probabilities"]),
    ("keep-largest-not-bool", {"IMAGE": GOOD_FRAME}, {"keep_largest": "often"}, ["keep_largest", "true or false"]),
    ("sw-batch-string", {"IMAGE": GOOD_FRAME}, {"sw_batch_size": "eight"}, ["sw_batch_size", "integer"]),
    ("network-not-string", {"IMAGE": GOOD_FRAME}, {"network": 5}, ["network", "string"]),
    ("over-pixel-limit", {"IMAGE_UINT8": np.zeros((1, 4097, 4096), np.uint8)}, None, ["pixels", str(TEST_MAX_PIXELS)]),
    # 804,609 windows of 128² (hours of work); the limit is 16 per 128² of the largest frame.
    ("over-window-limit", {"IMAGE_UINT8": np.zeros((1, 1024, 1024), np.uint8)}, {"overlap": 0.99},
     ["overlap 0.99", "804609 windows", f"limit of {TEST_MAX_PIXELS // 128**2 * 16}", "smaller overlap"]),
    ("pixels-mislabelled", {"IMAGE": GOOD_FRAME.astype(np.uint16)}, None, ["IMAGE", "data-type"]),
    ("unknown-input", {"FRAME": GOOD_FRAME}, None, ["FRAME"]),
]



def assert_refused(endpoint: Endpoint, refused: pytest.ExceptionInfo, expected_words: list[str], status=True) -> str:
    message = refused.value.message()
    if status:
        assert str(refused.value.status()) == REFUSED_STATUS[endpoint.protocol], message
    for word in expected_words:
        assert word.lower() in message.lower(), message
    record_for_table(refused.value, message)
    return message


def record_for_table(error: InferenceServerException, message: str) -> None:
    """With $SEGSERVE_ERROR_TABLE set, append "case <tab> status <tab> message" to that file (the
    table of malformed requests and their errors in the docs is made this way)."""
    table = os.environ.get("SEGSERVE_ERROR_TABLE")
    if table:
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        with open(table, "a") as handle:
            handle.write(f"{case}\t{error.status()}\t{' '.join(message.split())}\n")


@pytest.mark.parametrize("inputs, parameters, expected_words", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_refused_clearly_and_server_keeps_serving(endpoint, inputs, parameters, expected_words):
    with pytest.raises(InferenceServerException) as refused:
        endpoint.infer(inputs, parameters)
    assert_refused(endpoint, refused, expected_words)
    endpoint.assert_still_serving()


def test_unknown_output_is_refused(endpoint):
    with pytest.raises(InferenceServerException) as refused:
        endpoint.infer({"IMAGE": GOOD_FRAME}, outputs=("NOT_AN_OUTPUT",))
    assert_refused(endpoint, refused, ["NOT_AN_OUTPUT"], status=False)
    endpoint.assert_still_serving()


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 300), (1, 257, 1), (1, 2, 2)], ids=["1x1", "1x300", "257x1", "2x2"])
def test_tiny_and_one_pixel_wide_frames_are_served(endpoint, shape):
    frame = np.random.default_rng(1).random(shape, dtype=np.float32)
    assert endpoint.infer({"IMAGE": frame}).as_numpy("MASK").shape == shape[1:]


# Shared-memory requests with bad region arguments: (id, region bytes, input byte_size, offset,
# region name, words expected). The frame is GOOD_FRAME (25200 bytes).
FRAME_BYTES = GOOD_FRAME.nbytes
BAD_SHARED_MEMORY = [
    ("region-too-small", 4096, FRAME_BYTES, 0, None, ["shared memory", "size"]),
    ("offset-past-end", 2 * FRAME_BYTES, FRAME_BYTES, 4 * FRAME_BYTES, None, ["offset"]),
    ("byte-size-wrong-for-shape", 2 * FRAME_BYTES, FRAME_BYTES - 4, 0, None, ["byte size"]),
    ("unregistered-region", 2 * FRAME_BYTES, FRAME_BYTES, 0, "no_such_region", ["no_such_region"]),
]


@pytest.fixture
def region(endpoint, request):
    """A registered system shared-memory region holding GOOD_FRAME, of the case's size."""
    size = request.param
    name = f"errors_test_{os.getpid()}_{endpoint.protocol}"
    handle = system_shm.create_shared_memory_region(name, f"/{name}", size)
    if size >= FRAME_BYTES:
        system_shm.set_shared_memory_region(handle, [GOOD_FRAME])
    endpoint.client.register_system_shared_memory(name, f"/{name}", size, headers=endpoint.token)
    yield name
    endpoint.client.unregister_system_shared_memory(name, headers=endpoint.token)
    system_shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("region, byte_size, offset, region_name, expected_words",
                         [(c[1], *c[2:]) for c in BAD_SHARED_MEMORY], ids=[c[0] for c in BAD_SHARED_MEMORY], indirect=["region"])
def test_bad_shared_memory_request_is_refused(endpoint, region, byte_size, offset, region_name, expected_words):
    tensor = endpoint.tensor("IMAGE", GOOD_FRAME, "FP32")
    tensor.set_shared_memory(region_name or region, byte_size, offset)
    with pytest.raises(InferenceServerException) as refused:
        endpoint.infer([tensor])
    assert_refused(endpoint, refused, expected_words, status=False)
    endpoint.assert_still_serving()


@pytest.mark.parametrize("region", [FRAME_BYTES], indirect=True)
def test_output_region_too_small_is_refused(endpoint, region):
    mask = endpoint.module.InferRequestedOutput("MASK")
    mask.set_shared_memory(region, 16)
    with pytest.raises(InferenceServerException) as refused:
        endpoint.infer({"IMAGE": GOOD_FRAME}, outputs=(mask,))
    assert_refused(endpoint, refused, ["MASK"], status=False)
    endpoint.assert_still_serving()
