"""Client of the segmentation service: ``SegmentationClient`` (Python API) and
``python -m client`` (CLI)."""

from client.api import SegmentationClient, SegmentationError, SegmentationResult

__all__ = ["SegmentationClient", "SegmentationError", "SegmentationResult"]
