"""Client of the segmentation service: ``SegmentationClient`` (Python API) and
``python -m client`` (CLI)."""

from client.api import Outcome, SegmentationClient, SegmentationError, SegmentationResult, SegmentOptions

__all__ = ["Outcome", "SegmentationClient", "SegmentationError", "SegmentationResult", "SegmentOptions"]
