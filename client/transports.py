"""How a frame and its outputs travel: in the request body (gRPC, HTTP) or through shared-memory
regions (system or CUDA) that the server reads and writes in place.

A transport serves one request at a time; the client keeps one per in-flight slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from client.connection import Connection, SegmentationError
from client.shared_memory import RegionSet

TRANSPORTS = ("grpc", "http", "shm", "cuda-shm")

# Input name per pixel type: the server casts, so 8/16-bit frames travel at their own size.
INPUT_BY_DTYPE = {
    np.dtype(np.float32): ("IMAGE", "FP32"),
    np.dtype(np.uint8): ("IMAGE_UINT8", "UINT8"),
    np.dtype(np.uint16): ("IMAGE_UINT16", "UINT16"),
    np.dtype(np.int16): ("IMAGE_INT16", "INT16"),
}


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """One requested output: its name, pixel type and the shape the server will return."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def output_specs(spatial_shape: tuple[int, ...], probabilities: bool, contour: bool,
                 num_classes: int | None = None) -> list[OutputSpec]:
    """Outputs of a frame with ``spatial_shape`` ``(H, W)``: MASK always, PROBABILITIES
    ``[K, H, W]`` float32 (needs ``num_classes``) and CONTOUR on request."""
    specs = [OutputSpec("MASK", np.dtype(np.uint8), tuple(spatial_shape))]
    if probabilities:
        specs.append(OutputSpec("PROBABILITIES", np.dtype(np.float32), (num_classes or 0, *spatial_shape)))
    if contour:
        specs.append(OutputSpec("CONTOUR", np.dtype(np.uint8), tuple(spatial_shape)))
    return specs


def frame_dtype(frame) -> np.dtype:
    """numpy dtype of a numpy array, torch tensor or CuPy array."""
    dtype = frame.dtype
    if isinstance(dtype, np.dtype):
        return dtype
    return np.dtype(str(dtype).removeprefix("torch."))


def on_gpu(frame) -> bool:
    """True for a torch or CuPy tensor in GPU memory."""
    device = getattr(frame, "device", None)
    return device is not None and ("cuda" in str(device).lower() or hasattr(device, "id"))


def to_host(frame) -> np.ndarray:
    """A numpy copy of a torch tensor or CuPy array (numpy arrays are returned as they are)."""
    if isinstance(frame, np.ndarray):
        return frame
    if hasattr(frame, "get"):  # CuPy
        return frame.get()
    return frame.detach().cpu().numpy()


class InlineTransport:
    """Tensors in the request and response bodies (gRPC or HTTP)."""

    def __init__(self, connection: Connection):
        self.connection = connection

    def infer(self, model: str, image, outputs: list[OutputSpec], parameters: dict) -> dict[str, np.ndarray]:
        """Run ``model`` on ``image`` ``[C, H, W]``; returns each requested output by name."""
        image = np.ascontiguousarray(to_host(image))
        input_name, triton_dtype = INPUT_BY_DTYPE[image.dtype]
        request_input = self.connection.input(input_name, image.shape, triton_dtype)
        request_input.set_data_from_numpy(image)
        response = self.connection.infer(
            model, [request_input], [self.connection.requested_output(spec.name) for spec in outputs], parameters)
        return {spec.name: response.as_numpy(spec.name) for spec in outputs}

    def close(self) -> None:
        self.connection.close()


class SharedMemoryTransport:
    """Input and outputs through this slot's shared-memory regions; the request carries only
    their names. ``kind`` is ``system`` (``/dev/shm``) or ``cuda`` (GPU ``device_id``)."""

    def __init__(self, connection: Connection, kind: str, device_id: int = 0):
        self.connection = connection
        self.regions = RegionSet(connection, kind, device_id)

    def infer(self, model: str, image, outputs: list[OutputSpec], parameters: dict) -> dict[str, np.ndarray]:
        dtype = frame_dtype(image)
        input_name, triton_dtype = INPUT_BY_DTYPE[dtype]
        if self.regions.kind == "system":
            image = np.ascontiguousarray(to_host(image))
        image_bytes = int(np.prod(image.shape)) * dtype.itemsize
        try:
            image_region = self.regions.region("IMAGE", image_bytes)
            image_region.write(image)
            request_input = self.connection.input(input_name, list(image.shape), triton_dtype)
            request_input.set_shared_memory(image_region.name, image_bytes)
            requested = []
            for spec in outputs:
                region = self.regions.region(spec.name, spec.nbytes)
                output = self.connection.requested_output(spec.name)
                output.set_shared_memory(region.name, spec.nbytes)
                requested.append(output)
            response = self.connection.infer(model, [request_input], requested, parameters)
        except SegmentationError as error:
            if error.retryable:
                self.regions.retire()
            raise
        return {spec.name: self._read(response, spec) for spec in outputs}

    def _read(self, response, spec: OutputSpec) -> np.ndarray:
        shape = tuple(self.connection.output_shape(response, spec.name))
        if shape != spec.shape:
            raise SegmentationError(f"{spec.name} came back with shape {list(shape)}, expected {list(spec.shape)}")
        return self.regions.regions[spec.name].read(spec.dtype, shape)

    def close(self) -> None:
        try:
            self.regions.close()
        finally:
            self.connection.close()
