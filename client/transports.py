"""How a frame and its outputs travel: in the request body (gRPC, HTTP) or through shared-memory
regions (system or CUDA) that the server reads and writes in place.

A transport serves one request at a time; the client keeps one per in-flight slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from client.connection import Connection, SegmentationError
from client.shared_memory import RegionSet
from segproto import INPUT_BY_DTYPE_NAME, OUTPUT_CONTOUR, OUTPUT_MASK, OUTPUT_PROBABILITIES

TRANSPORTS = ("grpc", "http", "shm", "cuda-shm")
# Where a volume given to a 2D model should go instead.
VOLUME_HINT = ("volumes go to model 'segment_3d': SegmentationClient(model='segment_3d').segment_volume(volume), "
               "or `python -m client segment-volume`")

# Input name per pixel type: the server casts, so 8/16-bit frames travel at their own size.
INPUT_BY_DTYPE = {np.dtype(name): names for name, names in INPUT_BY_DTYPE_NAME.items()}
# Pixel types of numpy frames converted to float32 on the client (the network computes in
# float32 anyway). float16, int8 and bool convert exactly. float64 and the 32/64-bit integers
# (counting detectors such as Pilatus and Eiger store uint32) are rounded to float32's 24-bit
# precision: counts up to 2**24 (16.7 million) exactly, larger values to within a relative
# 6e-8 (2**-24), far below what the normalisation to [0, 1] resolves. CPU tensors become numpy
# arrays and are cast alike; GPU tensors are not cast (check_pixel_type, numpy_cast).
NUMPY_CAST_TO_FLOAT32 = tuple(np.dtype(t) for t in (np.float16, np.float64, np.int8, bool,
                                                     np.int32, np.uint32, np.int64, np.uint64))


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
    specs = [OutputSpec(OUTPUT_MASK, np.dtype(np.uint8), tuple(spatial_shape))]
    if probabilities:
        specs.append(OutputSpec(OUTPUT_PROBABILITIES, np.dtype(np.float32), (num_classes or 0, *spatial_shape)))
    if contour:
        specs.append(OutputSpec(OUTPUT_CONTOUR, np.dtype(np.uint8), tuple(spatial_shape)))
    return specs


def frame_dtype(frame) -> np.dtype:
    """numpy dtype of a numpy array, torch tensor or CuPy array.

    Raises:
        ValueError: a tensor type numpy has no dtype for (torch.bfloat16).
    """
    dtype = frame.dtype
    if isinstance(dtype, np.dtype):
        return dtype
    try:
        return np.dtype(str(dtype).removeprefix("torch."))
    except TypeError:
        raise ValueError(f"pixel type {dtype} is not supported; use one of {supported_pixel_types()}") from None


def supported_pixel_types() -> str:
    return ", ".join(str(d) for d in INPUT_BY_DTYPE)


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


def check_pixel_type(dtype, label: str = "", numpy_cast: bool = True) -> None:
    """Refuse a pixel type no request takes: those of INPUT_BY_DTYPE travel as stored, those
    of NUMPY_CAST_TO_FLOAT32 as float32 when ``numpy_cast`` (numpy arrays, and CPU tensors,
    which become numpy arrays, are cast; GPU tensors are not). ``label``: what the error names first."""
    dtype = np.dtype(dtype)
    if numpy_cast and not dtype.isnative:
        dtype = dtype.newbyteorder("=")  # big-endian numpy frames are byte-swapped
    if dtype not in INPUT_BY_DTYPE and not (numpy_cast and dtype in NUMPY_CAST_TO_FLOAT32):
        raise ValueError(f"{label}pixel type {dtype} is not supported; use one of {supported_pixel_types()}")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32(frame: np.ndarray) -> np.ndarray:
    """``frame`` cast to float32.

    Raises:
        ValueError: a float64 frame with finite values beyond float32's range (their cast is
            Inf, which the server refused as "NaN or Inf pixels" the frame did not have).
    """
    if frame.dtype == np.float64:
        finite = np.isfinite(frame)
        beyond = np.abs(frame, where=finite, out=np.zeros_like(frame)) > FLOAT32_MAX
        if beyond.any():
            raise ValueError(f"{int(beyond.sum())} pixel(s) beyond float32's range (|value| > {FLOAT32_MAX:.3g}, the "
                             "network computes in float32), such as "
                             f"{frame[tuple(np.argwhere(beyond)[0])]:.3g}; scale the frame first")
    return frame.astype(np.float32)


def as_channel_first(frame, spatial_dims: int = 2):
    """``[H, W]`` -> ``[1, H, W]``; ``[C, H, W]`` unchanged (one more axis each for a 3D
    network: ``[D, H, W]`` or ``[C, D, H, W]``); numpy frames (and CPU tensors) of
    NUMPY_CAST_TO_FLOAT32 (float64, float16, int8, bool, int32, uint32, int64, uint64) ->
    float32 (the network computes in float32 anyway). GPU tensors keep their device and pixel type.

    Raises:
        ValueError: unsupported rank or pixel type.
    """
    if hasattr(frame, "detach"):  # torch: no autograd history; the dtype checked before numpy sees it
        frame = frame.detach()
        check_pixel_type(frame_dtype(frame), numpy_cast=not on_gpu(frame))  # CPU tensors become numpy arrays
    if not on_gpu(frame) and not isinstance(frame, np.ndarray):
        frame = np.asarray(frame)
    if isinstance(frame, np.ndarray) and not frame.dtype.isnative:  # big-endian (FITS, some TIFFs)
        frame = frame.astype(frame.dtype.newbyteorder("="))
    if isinstance(frame, np.ndarray) and frame.dtype in NUMPY_CAST_TO_FLOAT32:
        frame = as_float32(frame)
    if frame.ndim == spatial_dims:
        frame = frame[None]
    if frame.ndim != spatial_dims + 1:
        axes = ", ".join("DHW"[-spatial_dims:])
        hint = f" (a volume [C, D, H, W]? {VOLUME_HINT})" if spatial_dims == 2 and frame.ndim == 4 else ""
        raise ValueError(f"{'volume' if spatial_dims == 3 else 'frame'} must be [{axes}] or [C, {axes}], "
                         f"got shape {list(frame.shape)}{hint}")
    check_pixel_type(frame_dtype(frame), numpy_cast=False)  # numpy arrays were cast above
    if 0 in frame.shape:
        raise ValueError(f"{'volume' if spatial_dims == 3 else 'frame'} is empty: shape {list(frame.shape)}")
    if isinstance(frame, np.ndarray):
        return np.ascontiguousarray(frame)
    if hasattr(frame, "contiguous"):  # torch
        return frame.contiguous()
    return frame if frame.flags.c_contiguous else frame.copy(order="C")  # CuPy


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
        # Copies: as_numpy's arrays are read-only views of the reply (those of shared memory,
        # and of stitched volumes, are writable; results behave alike on every transport).
        return {spec.name: np.array(response.as_numpy(spec.name)) for spec in outputs}

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
