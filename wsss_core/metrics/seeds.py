"""Numbers over seeds: mean ± standard deviation of one number across an experiment's seed runs, and the paired
comparison of two experiments run with the same seeds (e.g. PPC vs PPC + FSAE).

The spread is the sample standard deviation (``ddof=1``, the estimate of the seed-to-seed standard deviation; 0
for one run). A paired comparison takes the per-seed differences ``d_s = b_s - a_s`` of the seeds both have and
reports their mean, standard deviation, the 95 % Student-t interval of the mean difference (``n - 1`` degrees of
freedom) and the two-sided paired t-test p-value. The difference *exceeds the seed-to-seed spread* when that
interval excludes 0 (p < 0.05); with one common seed there is no spread to compare with and the verdict is None.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

#: two-sided level of the paired interval
CONFIDENCE = 0.95


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of the runs' values (None = the run has no such number, skipped; all None
    -> mean and std None). ``std``: sample standard deviation (ddof 1), 0.0 for one value."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size),
            "values": list(values)}


def mean_std_vectors(vectors: Sequence[Sequence[float | None]]) -> dict[str, list[float | None]]:
    """Element-wise :func:`mean_std` of equally long vectors (e.g. per-class IoU, None / NaN = absent class):
    ``{"mean": [...], "std": [...], "n": [...]}``."""
    if not vectors:
        return {"mean": [], "std": [], "n": []}
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        raise ValueError(f"vectors of different lengths {sorted(lengths)}")
    cols = [mean_std([v[i] for v in vectors]) for i in range(lengths.pop())]
    return {k: [c[k] for c in cols] for k in ("mean", "std", "n")}


def paired_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``b - a`` over the seeds both have a number for (``{seed: value}`` each).

    Returns ``{"seeds", "differences", "n", "mean", "std", "ci": [lo, hi], "t", "p", "spread_a", "spread_b",
    "exceeds_spread"}``; ``ci``, ``t``, ``p`` and ``exceeds_spread`` are None below two common seeds (and ``t`` /
    ``p`` when every difference is the same, std 0: then the interval is the point itself)."""
    from scipy import stats

    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    d = np.asarray([float(b[s]) - float(a[s]) for s in seeds], dtype=np.float64)
    out: dict[str, Any] = {"seeds": seeds, "differences": d.tolist(), "n": int(d.size),
                           "mean": float(d.mean()) if d.size else None,
                           "std": float(d.std(ddof=1)) if d.size > 1 else None,
                           "ci": None, "t": None, "p": None,
                           "spread_a": mean_std([a[s] for s in seeds])["std"],
                           "spread_b": mean_std([b[s] for s in seeds])["std"], "exceeds_spread": None}
    if d.size < 2:
        return out
    se = out["std"] / math.sqrt(d.size)
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * se
    out["ci"] = [out["mean"] - half, out["mean"] + half]
    if se > 0:
        out["t"] = out["mean"] / se
        out["p"] = float(2 * stats.t.sf(abs(out["t"]), d.size - 1))
    out["exceeds_spread"] = bool(out["ci"][0] > 0 or out["ci"][1] < 0)
    return out
