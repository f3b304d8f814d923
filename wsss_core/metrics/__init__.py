"""Split-level segmentation metrics (mIoU, precision/recall, FP/FN, threshold curves and their search)."""

from .miou import (
    DEFAULT_THRESHOLDS,
    ConfusionMatrix,
    ThresholdCurve,
    cam_to_labels,
    scores_from_confusion,
)
from .search import SEARCHES, greedy_scan, greedy_threshold_search, search_criterion, select_index

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ConfusionMatrix",
    "ThresholdCurve",
    "cam_to_labels",
    "scores_from_confusion",
    "SEARCHES",
    "greedy_scan",
    "greedy_threshold_search",
    "search_criterion",
    "select_index",
]
