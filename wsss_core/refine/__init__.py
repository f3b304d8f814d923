"""Dense CRF refinement of CAMs / score maps (pydensecrf is imported lazily)."""

from .crf import (
    PRESETS,
    CRFParams,
    bg_power,
    compact_hard_labels,
    crf_params,
    crf_refine_cams,
    dense_crf,
)

__all__ = [
    "PRESETS",
    "CRFParams",
    "bg_power",
    "compact_hard_labels",
    "crf_params",
    "crf_refine_cams",
    "dense_crf",
]
