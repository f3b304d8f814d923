"""Background-threshold search over an mIoU curve: exhaustive (``grid``) or MCTformer's greedy early stop.

Both rules read a sequence of mIoU values ``v_0, v_1, ...`` measured at increasing thresholds ``t_0 < t_1 < ...``
and return the index of the chosen threshold:

- ``grid``: the first index of the maximum (ties go to the smallest threshold), i.e. the argmax of the whole
  curve. NaN (``None``) values are skipped; all NaN gives ``None``.
- ``greedy`` (``xulianuwa/MCTformer`` branch ``MCTformerPlus`` ``evaluation.py``, ``__main__`` with ``--curve``): walk
  the thresholds in order and stop at the first value that does not strictly improve on the best so far; the chosen
  index is the last improvement, i.e. the **first local maximum** of the curve. A NaN value counts as no improvement
  (it stops the walk); a NaN first value gives ``None``. The walk reads the values lazily, so a sequential evaluation
  (:func:`greedy_threshold_search`) computes mIoU only up to the first non-improvement and chooses exactly what the same
  rule chooses on a full precomputed curve.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["SEARCHES", "greedy_scan", "select_index", "greedy_threshold_search", "search_criterion"]

#: The threshold-search rules of ``stages.eval.search``.
SEARCHES = ("grid", "greedy")


def _value(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def greedy_scan(values: Iterable[float | None]) -> tuple[int | None, list[float]]:
    """The greedy walk over ``values`` (consumed lazily, in order).

    Returns ``(index of the first local maximum or None, the values read)``; the values read end with the first
    non-improving one (when the walk stopped early), as MCTformer's logged curve does.
    """
    best_i, best, seen = None, -math.inf, []
    for i, v in enumerate(values):
        v = _value(v)
        seen.append(v)
        if v > best:              # NaN > x is False: a NaN stops the walk
            best_i, best = i, v
        else:
            break
    return best_i, seen


def select_index(values: Sequence[float | None], search: str = "grid") -> int | None:
    """Index of the chosen threshold on a full curve ``values`` (one mIoU per threshold, None = NaN).

    ``grid``: first index of the maximum; ``greedy``: first local maximum (see the module docstring). None when
    no value can be chosen (all NaN for grid, a NaN first value for greedy).
    """
    if search == "greedy":
        return greedy_scan(values)[0]
    if search != "grid":
        raise ValueError(f"unknown threshold search {search!r}; expected one of {SEARCHES}")
    arr = np.array([_value(v) for v in values], dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return None
    return int(np.nanargmax(arr))


def greedy_threshold_search(miou_at: Callable[[float], float], thresholds: Sequence[float]
                            ) -> tuple[float | None, float | None, list[float]]:
    """Sequential greedy search: call ``miou_at(t)`` for t in ``thresholds`` (increasing) until the first
    non-improvement. Returns ``(chosen t, its mIoU, the mIoUs computed)``; ``(None, None, seen)`` if none."""
    i, seen = greedy_scan(miou_at(float(t)) for t in thresholds)
    return (None, None, seen) if i is None else (float(thresholds[i]), seen[i], seen)


def search_criterion(search: str, mean: str, thresholds: Sequence[float]) -> str:
    """Human-readable statement of how t was chosen (recorded in ``cams.json`` and shown in the report)."""
    n, lo, hi = len(thresholds), float(thresholds[0]), float(thresholds[-1])
    if search == "greedy":
        return (f"greedy search (MCTformer --curve): first local maximum of {mean} mIoU, walking {n} thresholds "
                f"{lo:g}..{hi:g} upwards and stopping at the first non-improvement")
    return f"argmax of {mean} mIoU over {n} thresholds {lo:g}..{hi:g}"
