"""segment_2d / segment_3d: thin shim; the logic is segserve.backend.sliding_window."""

from segserve.backend.sliding_window import TritonPythonModel  # noqa: F401
