"""Python API of the segmentation service.

    from client import SegmentationClient
    with SegmentationClient("127.0.0.1:8001") as seg:
        result = seg.segment(frame)            # frame: [H, W] or [C, H, W] numpy array
        result.mask                            # [H, W] uint8 class per pixel
        seg.segment(frame, probabilities=True).probabilities   # [K, H, W] float32
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

# Input name per pixel type: the server casts, so 8/16-bit frames travel at their own size.
INPUT_BY_DTYPE = {
    np.dtype(np.float32): ("IMAGE", "FP32"),
    np.dtype(np.uint8): ("IMAGE_UINT8", "UINT8"),
    np.dtype(np.uint16): ("IMAGE_UINT16", "UINT16"),
    np.dtype(np.int16): ("IMAGE_INT16", "INT16"),
}
LOSSLESS_TO_FLOAT32 = (np.dtype(np.float16), np.dtype(np.float64), np.dtype(np.int8), np.dtype(bool))


class SegmentationError(RuntimeError):
    """The server refused or failed the request; the message is the server's."""


@dataclasses.dataclass
class SegmentationResult:
    """One frame's outputs: mask ``[H, W]`` uint8; probabilities ``[K, H, W]`` float32 and
    contour ``[H, W]`` uint8 when asked for, else None."""

    mask: np.ndarray
    probabilities: np.ndarray | None = None
    contour: np.ndarray | None = None


def as_channel_first(frame: np.ndarray) -> np.ndarray:
    """``[H, W]`` -> ``[1, H, W]``; ``[C, H, W]`` unchanged. float64/float16/int8/bool -> float32
    (float64 loses precision beyond float32, which the network computes in anyway)."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = frame[np.newaxis]
    if frame.dtype in LOSSLESS_TO_FLOAT32:
        frame = frame.astype(np.float32)
    if frame.dtype not in INPUT_BY_DTYPE:
        supported = ", ".join(str(d) for d in INPUT_BY_DTYPE)
        raise ValueError(f"pixel type {frame.dtype} is not supported; use one of {supported}")
    return np.ascontiguousarray(frame)


class SegmentationClient:
    """gRPC client of the ``segment_2d`` ensemble.

    Args:
        url: ``host:port`` of the server's gRPC endpoint.
        model: ensemble to call.
        network: network model to use (None: the server's default).
        timeout_s: per-request deadline in seconds (None: no deadline).
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "segment_2d", network: str | None = None,
                 timeout_s: float | None = None):
        self.url = url
        self.model = model
        self.network = network
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    def request_parameters(self, probabilities: bool, contour: bool, **options) -> dict:
        """Request parameters of one call; options left as None are not sent."""
        parameters = {name: value for name, value in options.items() if value is not None}
        if self.network is not None:
            parameters.setdefault("network", self.network)
        if probabilities:
            parameters["probabilities"] = True
        if contour:
            parameters["contour"] = True
        return parameters

    def segment(self, frame: np.ndarray, *, probabilities: bool = False, contour: bool = False,
                keep_largest: bool | None = None, overlap: float | None = None, blend: str | None = None,
                sw_batch_size: int | None = None, intensity_min: float | None = None,
                intensity_max: float | None = None) -> SegmentationResult:
        """Segment one frame ``[H, W]`` or ``[C, H, W]`` (float32, uint8, uint16 or int16).

        Raises:
            ValueError: unsupported pixel type or rank (checked before sending).
            SegmentationError: the server's error, e.g. a bad option value.
        """
        image = as_channel_first(frame)
        if image.ndim != 3:
            raise ValueError(f"frame must be [H, W] or [C, H, W], got shape {list(np.shape(frame))}")
        input_name, triton_dtype = INPUT_BY_DTYPE[image.dtype]
        image_input = grpcclient.InferInput(input_name, list(image.shape), triton_dtype)
        image_input.set_data_from_numpy(image)
        names = ["MASK"] + (["PROBABILITIES"] if probabilities else []) + (["CONTOUR"] if contour else [])
        parameters = self.request_parameters(
            probabilities, contour, keep_largest=keep_largest, overlap=overlap, blend=blend,
            sw_batch_size=sw_batch_size, intensity_min=intensity_min, intensity_max=intensity_max)
        try:
            response = self._client.infer(
                self.model, [image_input], outputs=[grpcclient.InferRequestedOutput(n) for n in names],
                parameters=parameters, client_timeout=self.timeout_s)
        except InferenceServerException as error:
            raise SegmentationError(error.message() or str(error)) from None
        return SegmentationResult(
            mask=response.as_numpy("MASK"),
            probabilities=response.as_numpy("PROBABILITIES") if probabilities else None,
            contour=response.as_numpy("CONTOUR") if contour else None,
        )
