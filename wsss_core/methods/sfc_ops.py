"""SFC (AAAI 2024, on SIPE) op core, groundwork for its method module (spec: ``sfc.md``).

- :func:`class_counts`: per-class image counts N_c of a training list from multi-hot labels;
- :func:`occurrence_weights`: the class-occurrence ("ROCon") weights of §3a,
  ``ben_c = sum_k |N_c - N_k|``, ``w_c = ben_c / (N_c + bank_correction)``, normalised to mean 1.
"""

from __future__ import annotations

import numpy as np

#: §3a: the reference's bank-resampling correction (≈ 660 steps/epoch x 4 resampled images x 3 / 20 classes).
BANK_CORRECTION = 396.0


def class_counts(labels: np.ndarray) -> np.ndarray:
    """(N, C) multi-hot foreground labels -> int64 (C,) number of images containing each class."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, C) multi-hot, got shape {labels.shape}")
    return (labels > 0.5).sum(axis=0).astype(np.int64)


def occurrence_weights(counts: np.ndarray, bank_correction: float = BANK_CORRECTION) -> np.ndarray:
    """§3a class weights from per-class image counts (C,) -> float64 (C,) with mean 1.

    ``ben_c = sum_k |N_c - N_k|`` (total gap to the other classes), ``w_c = ben_c / (N_c + bank_correction)``,
    then ``w / mean(w)``. U-shaped in frequency: both the most and the least frequent classes are up-weighted.
    Permutation-equivariant in the counts. The background channel (not included here) has weight 1.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size < 2 or (n < 0).any():
        raise ValueError(f"counts must be a 1-D array of >= 2 non-negative values, got {counts!r}")
    ben = np.abs(n[:, None] - n[None, :]).sum(axis=1)
    w = ben / (n + bank_correction)
    if not w.mean() > 0:
        raise ValueError("all classes have the same count: the weights are undefined (all gaps are 0)")
    return w / w.mean()
