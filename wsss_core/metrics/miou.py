"""Split-level segmentation metrics: confusion matrix, mIoU (two mean conventions) and threshold curves.

Counting (identical for every seed method; cf. ``usr922/wseg`` ``eval.py::do_python_eval`` and ``chenqi1126/SIPE``
``eval_cam.py::run`` with chainercv ``calc_semantic_segmentation_confusion``):

- Counts are accumulated over a **whole split**, never averaged per image.
- Pixels whose ground truth equals ``ignore_index`` (255, the VOC void band) count for nothing.
- ``M[gt, pred]`` is an int64 confusion matrix over the valid pixels. A prediction outside
  ``0..n_classes-1`` on a valid pixel (e.g. 255) is kept in an extra "invalid prediction" column:
  it counts in ``T_c`` (the row total of its gt class) but in no ``P_c``.
- ``TP_c = M[c, c]``, ``T_c = row total (incl. invalid)``, ``P_c = column sum``,
  ``IoU_c = TP_c / (T_c + P_c - TP_c)`` (exact, no epsilon).

Two conventions for the mean are reported:

- ``miou`` (project default, SIPE/chainercv style): the mean over the classes that are *present*,
  i.e. with ``T_c + P_c > 0``; a class absent from both GT and prediction (0/0) is excluded.
- ``miou_strict`` (SEAM/RTC/PPC ``do_python_eval`` style): the mean over all ``n_classes``; an absent
  class counts as IoU 0.

On full VOC splits every class is present and the two agree; they differ on subsets and tiny tests.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..data.io import IGNORE_INDEX
from .search import select_index

__all__ = [
    "ConfusionMatrix",
    "scores_from_confusion",
    "cam_to_labels",
    "ThresholdCurve",
    "DEFAULT_THRESHOLDS",
]

#: The RTC/wseg ``--curve`` thresholds: 0.00, 0.01, ..., 0.59 (60 values).
DEFAULT_THRESHOLDS = np.round(np.arange(60) * 0.01, 2)


# --------------------------------------------------------------------------------------------- helpers

def _check_n_classes(n_classes: int) -> int:
    n = int(n_classes)
    if n != n_classes or n < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    return n


def _as_int_array(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be an integer label array, got dtype {a.dtype}")
    return a


def _valid_gt(gt: np.ndarray, n_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (valid mask, gt values at valid pixels as int64); raise on gt labels outside 0..n-1."""
    gt = _as_int_array(gt, "gt")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64, copy=False)
    if g.size and (g.min() < 0 or g.max() >= n_classes):
        bad = np.unique(g[(g < 0) | (g >= n_classes)])
        raise ValueError(f"ground truth contains labels {bad.tolist()[:10]} outside 0..{n_classes - 1} "
                         f"that are not the ignore label {ignore_index}; wrong n_classes or a colour mask?")
    return valid, g


def _pred_columns(pred_valid: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 prediction column indices; anything outside 0..n-1 goes to the invalid column n."""
    p = pred_valid.astype(np.int64, copy=False)
    return np.where((p < 0) | (p >= n_classes), n_classes, p)


def _nan_to_none(values) -> list:
    """Python floats, with NaN written as None (JSON has no NaN)."""
    return [None if math.isnan(v) else v for v in (float(x) for x in values)]


def _scalar(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------------------------- scores

def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str] | None = None,
                          invalid_pred: np.ndarray | None = None) -> dict:
    """All metrics from a confusion matrix.

    Args:
        conf: (n, n) integer matrix ``M[gt, pred]`` over valid pixels.
        class_names: optional n names, copied into the result.
        invalid_pred: optional (n,) counts of valid pixels of each gt class whose prediction was outside
            ``0..n-1``; they add to ``T_c`` only.

    Returns:
        A JSON-serialisable dict (NaN written as ``None``):
        ``iou`` (n), ``miou`` (mean over present classes, ``T_c + P_c > 0``), ``miou_strict`` (mean over all
        n classes, absent = 0, SEAM style), ``precision`` TP/P, ``recall`` TP/T, ``fp`` (P-TP)/union,
        ``fn`` (T-TP)/union, ``pixel_acc`` ΣTP/ΣT, ``mean_acc`` (nanmean of recall), ``fwiou``
        Σ (T_c/ΣT)·IoU_c, ``present`` (n bools), ``n_pixels`` (valid pixels), ``n_invalid_pred``, and
        ``class_names`` when given.
    """
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (n, n), got shape {conf.shape}")
    conf = conf.astype(np.int64, copy=False)
    n = conf.shape[0]
    if invalid_pred is None:
        invalid_pred = np.zeros(n, dtype=np.int64)
    invalid_pred = np.asarray(invalid_pred, dtype=np.int64)
    if invalid_pred.shape != (n,):
        raise ValueError(f"invalid_pred must have shape ({n},), got {invalid_pred.shape}")
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"class_names has {len(class_names)} entries, expected {n}")

    tp = np.diag(conf).copy()
    t = conf.sum(axis=1) + invalid_pred
    p = conf.sum(axis=0)
    union = t + p - tp
    present = union > 0

    iou = _safe_div(tp, union)
    precision = _safe_div(tp, p)
    recall = _safe_div(tp, t)
    fp = _safe_div(p - tp, union)
    fn = _safe_div(t - tp, union)

    n_pixels = int(t.sum())
    miou = float(np.mean(iou[present])) if present.any() else float("nan")
    miou_strict = float(np.sum(np.where(present, iou, 0.0)) / n)
    pixel_acc = float(tp.sum() / n_pixels) if n_pixels else float("nan")
    has_t = t > 0
    mean_acc = float(np.mean(recall[has_t])) if has_t.any() else float("nan")
    fwiou = float(np.sum(np.where(has_t, t / max(n_pixels, 1) * np.nan_to_num(iou), 0.0))) if n_pixels \
        else float("nan")

    out = {
        "iou": _nan_to_none(iou),
        "miou": _scalar(miou),
        "miou_strict": _scalar(miou_strict),
        "precision": _nan_to_none(precision),
        "recall": _nan_to_none(recall),
        "fp": _nan_to_none(fp),
        "fn": _nan_to_none(fn),
        "pixel_acc": _scalar(pixel_acc),
        "mean_acc": _scalar(mean_acc),
        "fwiou": _scalar(fwiou),
        "present": [bool(x) for x in present],
        "n_pixels": n_pixels,
        "n_invalid_pred": int(invalid_pred.sum()),
    }
    if class_names is not None:
        out["class_names"] = [str(c) for c in class_names]
    return out


class ConfusionMatrix:
    """Accumulates an int64 confusion matrix ``M[gt, pred]`` over a whole split.

    Internally the matrix is (n, n + 1): the last column counts valid pixels whose prediction is outside
    ``0..n-1`` (e.g. 255). Those pixels count in their gt class's ``T_c`` and in no ``P_c``.
    """

    def __init__(self, n_classes: int, ignore_index: int = IGNORE_INDEX):
        self.n_classes = _check_n_classes(n_classes)
        self.ignore_index = int(ignore_index)
        self._m = np.zeros((self.n_classes, self.n_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image (or any batch). ``gt`` and ``pred``: integer arrays of the same shape, any shape.

        Pixels with ``gt == ignore_index`` are skipped whatever the prediction; other gt values must be in
        ``0..n-1`` (ValueError otherwise).
        """
        gt = np.asarray(gt)
        pred = _as_int_array(pred, "pred")
        if gt.shape != pred.shape:
            raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}")
        valid, g = _valid_gt(gt, self.n_classes, self.ignore_index)
        p = _pred_columns(pred[valid], self.n_classes)
        ncol = self.n_classes + 1
        counts = np.bincount(g * ncol + p, minlength=self.n_classes * ncol)
        self._m += counts.reshape(self.n_classes, ncol).astype(np.int64, copy=False)

    @property
    def matrix(self) -> np.ndarray:
        """(n, n) int64 copy of ``M[gt, pred]`` (without the invalid-prediction column)."""
        return self._m[:, : self.n_classes].copy()

    @property
    def invalid_pred(self) -> np.ndarray:
        """(n,) int64: valid pixels per gt class whose prediction was outside 0..n-1."""
        return self._m[:, self.n_classes].copy()

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add the counts of another ConfusionMatrix (same n_classes and ignore_index) in place."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.n_classes != self.n_classes or other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge: n_classes/ignore_index {other.n_classes}/{other.ignore_index} "
                             f"vs {self.n_classes}/{self.ignore_index}")
        self._m += other._m

    def scores(self, class_names: Sequence[str] | None = None) -> dict:
        """The metrics dict of :func:`scores_from_confusion` (``miou`` = present-class mean,
        ``miou_strict`` = mean over all n classes with absent = 0)."""
        return scores_from_confusion(self.matrix, class_names, invalid_pred=self.invalid_pred)


# --------------------------------------------------------------------------------------------- CAM thresholds

def _check_cams_keys(cams: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {cams.shape}")
    if not np.issubdtype(cams.dtype, np.floating):
        cams = cams.astype(np.float64)
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.shape[0] != cams.shape[0]:
        raise ValueError(f"keys must have shape ({cams.shape[0]},) to match cams {cams.shape}, got {keys.shape}")
    if keys.size:
        if not np.issubdtype(keys.dtype, np.integer):
            raise ValueError(f"keys must be integer class labels, got dtype {keys.dtype}")
        fg = keys[1:] if keys[0] == 0 else keys  # a background map may come first (key 0; SIPE/SFC IS-CAM)
        if (fg.size and fg.min() < 1) or keys.max() > 254:
            raise ValueError(f"keys must be class labels in 1..254, optionally after one leading 0 (a background "
                             f"map), got {keys.tolist()}")
    return cams, keys.astype(np.int64)


def _max_and_label(cams: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: v = max_k cams (cams' dtype), c = keys[first argmax]. Raises on NaN."""
    v, idx = _max_and_index(cams)
    return v, keys[idx]


def _max_and_index(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of float (K, H, W), K >= 1: v = max_k cams (cams' dtype) and the first k reaching it (intp (H, W)),
    as ``cams.max(0)`` / ``cams.argmax(0)`` but with one contiguous pass per channel (numpy's reductions over the
    leading axis of a (K, H, W) array are several times slower). Raises on NaN."""
    v = cams[0].copy()
    idx = np.zeros(v.shape, dtype=np.intp)
    for k in range(1, cams.shape[0]):
        higher = cams[k] > v           # strict: an equal later channel does not win (first argmax)
        idx[higher] = k
        np.maximum(v, cams[k], out=v)
    if np.isnan(v).any():  # np.maximum propagates a NaN of any channel
        raise ValueError("cams contain NaN")
    return v, idx


def _count_below(thresholds: np.ndarray, v: np.ndarray) -> np.ndarray:
    """intp array of ``#{j : thresholds[j] < v}`` per element of ``v`` (= ``np.searchsorted(thresholds, v, "left")``),
    exactly, in ``thresholds``' dtype (which must be v's). For evenly spaced thresholds (the curve's grid) the count
    is estimated arithmetically and corrected by comparing with its neighbours, which is several times faster than a
    binary search per pixel; otherwise, or if the estimate does not settle, it falls back to ``np.searchsorted``."""
    j = thresholds.size
    if j >= 2 and np.issubdtype(v.dtype, np.floating):
        t0, step = float(thresholds[0]), (float(thresholds[-1]) - float(thresholds[0])) / (j - 1)
        if step > 0 and np.allclose(np.diff(thresholds.astype(np.float64)), step, rtol=1e-2, atol=0):
            e = (v - v.dtype.type(t0)) / v.dtype.type(step)
            np.ceil(e, out=e)
            np.clip(e, 0, j, out=e)
            e = e.astype(np.intp)
            ext = np.concatenate([[-np.inf], thresholds, [np.inf]]).astype(thresholds.dtype)  # ext[e] = thr[e - 1]
            for _ in range(4):
                down = ext[e] >= v          # thr[e - 1] >= v: e too large
                up = ext[e + 1] < v         # thr[e] < v: e too small
                if not down.any() and not up.any():
                    return e
                e -= down
                e += up
    return np.searchsorted(thresholds, v, side="left").astype(np.intp)


def cam_to_labels(cams: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Hard labels from foreground CAMs and a constant background score.

    Args:
        cams: float (K, H, W) scores of the image's foreground classes.
        keys: int (K,) class label of each channel, in 1..C-1; a leading 0 marks a background map (then the
            result at t = 0 is ``keys[argmax]``, the SIPE/SFC protocol).
        threshold: the background score t.

    Returns:
        uint8 (H, W): ``keys[argmax_k cams]`` where ``max_k cams > t``, else 0. An exact tie with t goes to
        background (as the argmax over ``[t, cams]`` with the lowest index winning); between two fg channels
        the lower k wins. The comparison is done in the CAMs' floating dtype (t is cast to it), as when t is
        written into the same float32 score tensor. K == 0 gives all background.
    """
    cams, keys = _check_cams_keys(cams, keys)
    h, w = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((h, w), dtype=np.uint8)
    v, c = _max_and_label(cams, keys)
    t = np.asarray(threshold, dtype=cams.dtype)
    return np.where(v > t, c, 0).astype(np.uint8)


class ThresholdCurve:
    """Confusion matrices of :func:`cam_to_labels` for many thresholds at once (RTC/wseg ``--curve``).

    The result equals, exactly, running ``cam_to_labels(cams, keys, t)`` + :class:`ConfusionMatrix` for every
    threshold t. Per valid pixel, v = max cam and c = its class; the pixel is foreground at t_j iff v > t_j,
    i.e. iff j < k(v) with k(v) = #thresholds strictly below v. Counts per (gt, c, k) are gathered with one
    bincount and each threshold's matrix is recovered with a reverse cumulative sum over k.

    Args:
        n_classes: number of classes incl. background.
        thresholds: 1-D increasing background scores (default 0.00..0.59 step 0.01).
        ignore_index: gt value that is skipped.
    """

    def __init__(self, n_classes: int, thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
                 ignore_index: int = IGNORE_INDEX):
        self.n_classes = _check_n_classes(n_classes)
        thr = np.asarray(thresholds, dtype=np.float64)
        if thr.ndim != 1 or thr.size == 0:
            raise ValueError(f"thresholds must be a non-empty 1-D sequence, got shape {thr.shape}")
        if np.isnan(thr).any() or np.any(np.diff(thr) <= 0):
            raise ValueError("thresholds must be strictly increasing and not NaN")
        self.thresholds = thr
        self.ignore_index = int(ignore_index)
        n, j = self.n_classes, thr.size
        # counts[g, c, k]: valid pixels with gt g, top class c (n = invalid label), k thresholds below v.
        self._counts = np.zeros((n, n + 1, j + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, cams: np.ndarray, keys: np.ndarray) -> None:
        """Add one image: gt (H, W) int, cams float (K, H, W), keys int (K,) (see :func:`cam_to_labels`)."""
        cams, keys = _check_cams_keys(cams, keys)
        gt = np.asarray(gt)
        if gt.shape != cams.shape[1:]:
            raise ValueError(f"gt shape {gt.shape} does not match cams {cams.shape}")
        if cams.shape[0] > 0:
            self._update_fast(_as_int_array(gt, "gt"), cams, keys)
            return
        # no foreground map (K = 0): every valid pixel is background at every threshold (column 0, k = 0)
        _, g = _valid_gt(gt, self.n_classes, self.ignore_index)
        self._counts[:, 0, 0] += np.bincount(g, minlength=self.n_classes)

    def _update_fast(self, gt: np.ndarray, cams: np.ndarray, keys: np.ndarray) -> None:
        """:meth:`update` for K >= 1 without compressing the valid pixels: ignored pixels go to an extra gt row n
        that is dropped after the one bincount; the prediction column is looked up per channel (keys), not per
        pixel. Same counts as the reference path (tests/test_perf_paths.py)."""
        n, nk = self.n_classes, self.thresholds.size + 1
        ignored = gt == self.ignore_index
        bad = (gt < 0) | (gt >= n)
        if (bad & ~ignored).any():
            _valid_gt(gt, n, self.ignore_index)  # raises with the message naming the labels
        v, idx = _max_and_index(cams)
        cols = _pred_columns(keys, n)                         # (K,) prediction column of each channel
        k = _count_below(self.thresholds.astype(v.dtype), v)  # (H, W) thresholds strictly below v
        row = gt.astype(np.intp)
        row[ignored] = n                                      # dump row for ignored pixels
        flat = row
        flat *= n + 1
        flat += cols[idx]
        flat *= nk
        flat += k
        counts = np.bincount(flat.ravel(), minlength=(n + 1) * (n + 1) * nk)
        self._counts += counts[: n * (n + 1) * nk].reshape(n, n + 1, nk)

    def merge(self, other: "ThresholdCurve") -> None:
        """Add another curve's counts (same n_classes, thresholds and ignore_index) in place."""
        if (other.n_classes != self.n_classes or other.ignore_index != self.ignore_index
                or not np.array_equal(other.thresholds, self.thresholds)):
            raise ValueError("cannot merge ThresholdCurves with different n_classes/thresholds/ignore_index")
        self._counts += other._counts

    def _full_at(self, j: int) -> np.ndarray:
        """(n, n + 1) matrix (last column = invalid prediction) at threshold index j."""
        n_thr = self.thresholds.size
        if not -n_thr <= j < n_thr:
            raise IndexError(f"threshold index {j} out of range for {n_thr} thresholds")
        j = j % n_thr
        fg = self._counts[:, :, j + 1:].sum(axis=2)          # pixels with k > j: foreground at t_j
        total = self._counts.sum(axis=(1, 2))                # all valid pixels per gt class
        full = fg.copy()
        full[:, 0] += total - fg.sum(axis=1)                 # the rest are predicted background
        return full

    def _all_full(self) -> np.ndarray:
        """(J, n, n + 1) matrices for all thresholds, via one reverse cumulative sum over k."""
        rev = np.cumsum(self._counts[:, :, ::-1], axis=2)[:, :, ::-1]   # rev[..., k] = sum_{k' >= k}
        fg = np.moveaxis(rev[:, :, 1:], 2, 0).copy()                   # fg at j = sum_{k > j}
        total = self._counts.sum(axis=(1, 2))
        fg[:, :, 0] += total[None, :] - fg.sum(axis=2)
        return fg

    def confusion_at(self, j: int) -> np.ndarray:
        """(n, n) int64 confusion matrix ``M[gt, pred]`` at ``thresholds[j]``."""
        return self._full_at(j)[:, : self.n_classes].copy()

    def result(self, class_names: Sequence[str] | None = None, strict: bool = False, search: str = "grid") -> dict:
        """Curve summary (JSON-serialisable).

        Returns ``thresholds``, ``miou`` and ``miou_strict`` (one value per threshold), ``selected_by`` (the mean
        used), ``search``, ``best_t`` (the threshold chosen on ``miou``, or ``miou_strict`` if ``strict``, by
        :func:`~wsss_core.metrics.search.select_index`: ``grid`` = the smallest threshold maximising it,
        ``greedy`` = its first local maximum, MCTformer's early-stopping ``--curve``), ``best_index``,
        ``best_miou``, ``scores_at_best`` (the full :func:`scores_from_confusion` dict at ``best_t``) and
        ``per_class_iou_at_best``.
        """
        n = self.n_classes
        allm = self._all_full()
        per_t = [scores_from_confusion(m[:, :n], class_names, invalid_pred=m[:, n]) for m in allm]
        miou = [s["miou"] for s in per_t]
        miou_strict = [s["miou_strict"] for s in per_t]
        key = miou_strict if strict else miou
        best = select_index(key, search)
        return {
            "thresholds": [float(t) for t in self.thresholds],
            "miou": miou,
            "miou_strict": miou_strict,
            "selected_by": "miou_strict" if strict else "miou",
            "search": search,
            "best_index": best,
            "best_t": None if best is None else float(self.thresholds[best]),
            "best_miou": None if best is None else key[best],
            "scores_at_best": None if best is None else per_t[best],
            "per_class_iou_at_best": None if best is None else per_t[best]["iou"],
        }
