"""Split-level segmentation metrics (mIoU, precision/recall, FP/FN, threshold curves)."""

from .miou import (
    DEFAULT_THRESHOLDS,
    ConfusionMatrix,
    ThresholdCurve,
    cam_to_labels,
    scores_from_confusion,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ConfusionMatrix",
    "ThresholdCurve",
    "cam_to_labels",
    "scores_from_confusion",
]
