"""Client of the segmentation service: ``SegmentationClient`` (Python API) and
``python -m client`` (CLI)."""

from client.api import (ChunkSettings, Outcome, SegmentationClient, SegmentationError, SegmentationResult,
                        SegmentOptions)

__all__ = ["ChunkSettings", "Outcome", "SegmentationClient", "SegmentationError", "SegmentationResult",
           "SegmentOptions"]
