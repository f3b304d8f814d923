"""Item 4, dense CRF: pseudo-masks per second of the refine stage's worker pool with 1 and 2 processes.

The stage's own code path: :func:`wsss_core.stages.refine.map_images` over ``_refine_one`` (read the CAMs from the
HDF5 shard, decode the JPEG, threshold + label-unary CRF ``seam_label``: 10 mean-field iterations, real pydensecrf2)
on a prepared dataset folder made here: VOC-sized JPEGs rendered from real VOC masks (../shared; toy masks when
absent) and their synthetic CAMs (:func:`common.synth_cams`).

- baseline: 1 worker (the reference style: one process loops over the images).
- ours: 2 worker processes (``crf.n_workers: 2``), pool start-up included.
- guard: the pseudo-masks of both runs are identical and in the same order, else exit 1.

    python bench/bench_crf.py [--images 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import load_voc_masks, render_image, result, synth_cams, write_result

from wsss_core.refine.crf import crf_params
from wsss_core.stages import refine
from wsss_core.store import ShardWriter

BG = 0.25


def make_prepared(root: Path, ids, masks) -> tuple[str, str]:
    """A minimal prepared dataset folder (manifest.json, labels.json, lists/) with JPEGs, and one CAM shard."""
    img_dir = root / "JPEGImages"
    img_dir.mkdir(parents=True)
    (root / "lists").mkdir()
    labels = {}
    with ShardWriter(root / "cams.h5", "cams", {"split": "bench"}) as w:
        for k, (i, m) in enumerate(zip(ids, masks)):
            Image.fromarray(render_image(m, k)).save(img_dir / f"{i}.jpg", quality=90)
            keys, cams = synth_cams(m, k)
            w.add_cams(i, keys, cams)
            labels[i] = [int(x) for x in keys]
    (root / "manifest.json").write_text(json.dumps({"image_dir": str(img_dir), "mask_dir": str(img_dir)}))
    (root / "labels.json").write_text(json.dumps({"classes": [f"c{c}" for c in range(21)], "labels": labels}))
    (root / "lists" / "bench.txt").write_text("\n".join(ids) + "\n")
    return str(root), str(root / "cams.h5")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers once the pool is shut down)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_pool(ids, n_workers: int, prepared: str, shard: str) -> tuple[float, list, float]:
    """(seconds, [(id, mask)], cores used on average = CPU seconds / wall seconds)."""
    params = crf_params("seam_label")
    c0, t0 = _cpu_seconds(), time.perf_counter()
    with refine.map_images(refine._refine_one, ids, n_workers, refine._init_worker, ([shard], prepared, params, BG),
                           lambda: refine._WORKER["store"].close()) as results:
        out = list(results)
    dt = time.perf_counter() - t0
    return dt, out, (_cpu_seconds() - c0) / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="a multiple of 16 keeps the pool's chunks of 8 balanced")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("pydensecrf") is None:
        write_result(result("4", "Dense CRF (pseudo-masks/s)", f"≥ 1.8x with {args.workers} workers", "—", "—",
                            None, None, baseline_what="1 worker", ours_what=f"{args.workers} workers",
                            reason="not run: pydensecrf2 is not installed"), "crf")
        return 0
    ids, masks, source = load_voc_masks(args.images, "train_voc")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        prepared, shard = make_prepared(Path(tmp) / "prepared", ids, masks)
        t1, out1, cores1 = run_pool(ids, 1, prepared, shard)
        t2, out2, cores2 = run_pool(ids, args.workers, prepared, shard)
    same = len(out1) == len(out2) and all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(out1, out2))
    if not same or [i for i, _ in out1] != list(ids):
        print("FAIL: the pseudo-masks of the 1- and multi-worker runs differ", file=sys.stderr)
        return 1
    n = len(ids)
    ratio = t1 / t2
    met = ratio >= 1.8
    print(f"CRF on {n} images: 1 worker {n / t1:.2f} masks/s ({cores1:.2f} cores busy), {args.workers} workers "
          f"{n / t2:.2f} masks/s ({cores2:.2f} cores busy) (x{ratio:.2f}, {cores} cores)")
    reason = ""
    if not met:
        reason = f"x{ratio:.2f} < 1.8 with {args.workers} workers on {cores} cores"
        if cores < args.workers:
            reason += " (fewer cores than workers)"
        elif cores2 < 0.8 * args.workers:
            reason += (f": the workers got only {cores2:.2f} cores on average (1 worker: {cores1:.2f}), i.e. other "
                       "processes were using the cores (rerun on an idle machine)")
    rec = result("4", "Dense CRF (pseudo-masks/s)", f"≥ 1.8x with {args.workers} workers",
                 f"{n / t1:.2f} masks/s (1 worker)", f"{n / t2:.2f} masks/s ({args.workers} workers)", ratio, met,
                 baseline_what="refine_crf worker pool with 1 process (in-process loop)",
                 ours_what=f"refine_crf worker pool with {args.workers} processes (chunks of 8, start-up included)",
                 reason=reason,
                 details={"images": n, "image_hw_mean": [float(np.mean([m.shape[0] for m in masks])),
                                                          float(np.mean([m.shape[1] for m in masks]))],
                          "crf": repr(crf_params("seam_label")), "bg_threshold": BG, "seconds_1": t1,
                          "seconds_n": t2, "workers": args.workers, "cores": cores, "identical_masks": True,
                          "cores_busy_1": cores1, "cores_busy_n": cores2},
                 data=source)
    rec["ratio_fmt"] = "{:.2f}x"
    write_result(rec, "crf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
