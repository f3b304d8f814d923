"""Shared helpers of the benchmarks: timing, data (real VOC masks when ../shared is present), results and the table.

Every ``bench/bench_<item>.py`` writes ``bench/out/<item>.json`` through :func:`write_result`; ``bench/run.py``
runs them all and renders :func:`table` into ``bench/README.md``. A result holds absolute times (they vary between
machines) and the ratio ours/baseline measured in the same run on the same inputs, which is what the goals are
about.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
SHARED = Path(os.environ.get("WSSS_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
MASK_TARBALL = DATA / "voc12_SegmentationClassAug.tar.gz"
VOC_LISTS = DATA / "voc12_lists"
COCO_LISTS = DATA / "coco14_lists"
VOC_SAMPLE = SHARED / "voc_sample"


# --------------------------------------------------------------------------------------------- timing

def best_of(fn: Callable[[], Any], reps: int = 3, warmup: int = 1) -> tuple[float, list[float], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times; returns (min seconds, all seconds, last result).

    The minimum is the figure least disturbed by other processes on a shared machine; all times are kept."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def best_of_interleaved(fns: dict[str, Callable[[], Any]], reps: int = 2) -> dict[str, tuple[float, list[float], Any]]:
    """Time several functions in turns (a, b, c, a, b, c, ...) so that a slow phase of a shared machine hits all of
    them alike; returns {name: (min seconds, all seconds, last result)}."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    last: dict[str, Any] = {}
    for _ in range(max(1, reps)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            last[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), v, last[k]) for k, v in times.items()}


class Stopwatch:
    """Accumulates the time spent inside ``with sw:`` blocks (to time one part of a loop)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t0


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "loadavg_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


# --------------------------------------------------------------------------------------------- data

def voc_ids(split: str) -> list[str] | None:
    """The real VOC 2012 ids of ``split`` (train_voc, val_voc, trainaug_voc, test) from ../shared (lines
    ``/JPEGImages/<id>.jpg [/SegmentationClassAug/<id>.png]``), or None."""
    p = VOC_LISTS / f"{split}.txt"
    if not p.is_file():
        return None
    return [Path(line.split()[0]).stem for line in p.read_text().splitlines() if line.strip()]


def load_voc_masks(n: int, split: str = "train_voc") -> tuple[list[str], list[np.ndarray], str]:
    """``n`` real VOC SegmentationClassAug masks (uint8 (H, W), 0..20 and 255): the first ``n`` ids of ``split``
    when the id list is present, else the first ``n`` names of the tarball in sorted order. Falls back to toy masks
    (``render_sample``, 128 px) when ../shared is absent. Returns (ids, masks, a description of the source)."""
    from wsss_core.data.io import read_label_png

    if MASK_TARBALL.is_file():
        wanted = voc_ids(split)
        with tarfile.open(MASK_TARBALL) as tar, tempfile.TemporaryDirectory() as tmp:
            members = {Path(m.name).stem: m for m in tar.getmembers() if m.isfile() and m.name.endswith(".png")}
            ids = [i for i in (wanted or sorted(members)) if i in members][:n]
            masks = []
            for i in ids:
                tar.extract(members[i], tmp, filter="data")
                masks.append(read_label_png(Path(tmp) / members[i].name, 21))
        src = f"{split}.txt" if wanted else "sorted tarball names"
        return ids, masks, f"real VOC SegmentationClassAug masks ({len(ids)} of {src}, {MASK_TARBALL.name})"
    from wsss_core.data.toy import render_sample

    rng = np.random.default_rng(0)
    masks = [render_sample(rng, 128)[1] for _ in range(n)]
    return [f"toy_{i:05d}" for i in range(n)], masks, "toy masks (../shared absent: no real VOC masks)"


def synth_cams(mask: np.ndarray, seed: int, stride: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Realistic synthetic CAMs of one mask: for each present class, a stride-``stride`` map (class coverage of each
    cell + noise, the shape of a network's output), ReLU'd, bilinearly upsampled to the mask size and divided by its
    max, as :func:`wsss_core.methods.inference.multiscale_cams` outputs.
    Returns (keys int64 (K,), float32 (K, H, W))."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = mask.shape
    keys = np.array(sorted(int(v) for v in np.unique(mask) if 0 < v < 255) or [1], dtype=np.int64)
    lh, lw = max(1, -(-h // stride)), max(1, -(-w // stride))
    cams = np.empty((len(keys), h, w), dtype=np.float32)
    for k, c in enumerate(keys):
        cover = cv2.resize((mask == c).astype(np.float32), (lw, lh), interpolation=cv2.INTER_AREA)
        low = cover * rng.uniform(0.6, 1.0, cover.shape) + rng.normal(0.0, 0.15, cover.shape) - 0.05
        low = np.maximum(low, 0).astype(np.float32)
        up = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
        cams[k] = np.maximum(up, 0) / (up.max() + 1e-5)
    return keys, cams


VOC_COLOURS = np.random.default_rng(12345).integers(30, 226, (256, 3))


def render_image(mask: np.ndarray, seed: int) -> np.ndarray:
    """A VOC-sized uint8 RGB (H, W, 3) image painted from a mask (a colour per class, smooth shading, noise, a
    slight blur), for the benchmarks that need images (CRF, data loading): their cost depends on the size, not the
    content."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = mask.shape
    img = VOC_COLOURS[mask].astype(np.float32)
    shade = cv2.resize(rng.normal(0, 20, (max(2, h // 32), max(2, w // 32), 3)).astype(np.float32), (w, h))
    img += shade + rng.normal(0, 6, img.shape)
    img = cv2.GaussianBlur(img, (5, 5), 1.0)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- results

def result(item: str, title: str, goal: str, baseline: str, ours: str, ratio: float | None, met: bool | None,
           *, baseline_what: str, ours_what: str, unit_note: str = "", reason: str = "", details: dict | None = None,
           data: str = "") -> dict:
    """One benchmark's record (JSON-serialisable): the table row fields plus free-form ``details``.

    ``ratio``: the figure the goal is about (speed-up baseline/ours, byte ratio ours/baseline, or seconds);
    ``met``: True / False, or None when the item was not run (then ``reason`` says why)."""
    return {"item": item, "title": title, "goal": goal, "baseline": baseline, "ours": ours, "ratio": ratio,
            "met": met, "baseline_what": baseline_what, "ours_what": ours_what, "unit_note": unit_note,
            "reason": reason, "data": data, "details": details or {}, "machine": machine(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(rec: dict | list[dict], name: str) -> Path:
    """Write ``bench/out/<name>.json`` (a record or a list of records) and print its rows."""
    OUT.mkdir(parents=True, exist_ok=True)
    p = OUT / f"{name}.json"
    p.write_text(json.dumps(rec, indent=2, default=float) + "\n")
    for r in (rec if isinstance(rec, list) else [rec]):
        print(row_text(r))
    print(f"wrote {p.relative_to(REPO)}")
    return p


def _ratio_text(r: dict) -> str:
    x = r.get("ratio")
    if x is None:
        return "—"
    return r.get("ratio_fmt", "{:.2f}").format(x) if isinstance(x, (int, float)) else str(x)


def _met_text(r: dict) -> str:
    return {True: "yes", False: "**no**", None: "not run"}[r.get("met")]


def row_text(r: dict) -> str:
    return (f"[{r['item']}] {r['title']}: goal {r['goal']}; baseline {r['baseline']}; ours {r['ours']}; "
            f"ratio {_ratio_text(r)}; met: {_met_text(r).strip('*')}")


def load_results(names: Sequence[str] | None = None) -> list[dict]:
    """All records of bench/out/*.json (in ``names`` order when given)."""
    files = [OUT / f"{n}.json" for n in names] if names else sorted(OUT.glob("*.json"))
    recs: list[dict] = []
    for p in files:
        if p.is_file():
            obj = json.loads(p.read_text())
            recs.extend(obj if isinstance(obj, list) else [obj])
    return recs


def table(recs: Sequence[dict]) -> str:
    """Markdown table: item, goal, baseline, ours, ratio, met?; then the items that miss their goal, with why."""
    lines = ["| item | goal | baseline | ours | ratio | met? |", "| --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        lines.append(f"| {r['item']} {r['title']} | {r['goal']} | {r['baseline']} | {r['ours']} | "
                     f"{_ratio_text(r)} | {_met_text(r)} |")
    missed = [r for r in recs if r.get("met") is not True]
    lines.append("")
    if missed:
        lines.append("Items that miss their goal (or were not run):")
        lines.append("")
        for r in missed:
            lines.append(f"- {r['item']} {r['title']}: {r.get('reason') or 'no reason recorded'}")
    else:
        lines.append("Every item meets its goal.")
    return "\n".join(lines)
