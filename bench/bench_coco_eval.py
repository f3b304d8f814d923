"""Item 10, evaluation memory at COCO scale: peak resident memory of ``eval_cams`` (the stage function
:func:`wsss_core.stages.evaluate.cam_scores`: 60-threshold curve on one split, scores on another) over N COCO-sized
(480 x 640) masks and their CAMs, for two values of N, each in a fresh process.

The evaluation streams: one image's mask and CAMs are in memory at a time, the state is the (thresholds, 81, 81)
confusion counts. So the peak must not grow with N; the guard fails (exit 1) when the larger run's peak exceeds the
smaller one's by more than 64 MB, or when the mIoU differs from a direct computation on the first images.

Inputs are synthetic: 81 classes, per image 1-4 rectangular objects and a float16 CAM per present class (a blurred
copy of its object), written once into an HDF5 CAM shard and label PNGs under a temporary folder. COCO val has 40,137
images; the default N values (500 and 2,000) keep the benchmark within a few minutes on 2 busy cores; ``--n`` sets
them (e.g. ``--n 2000 40137`` for the full count, about an hour and 25 GB of temporary files).

    python bench/bench_coco_eval.py [--n 500 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, result, write_result

H, W, C = 480, 640, 81


def make_data(root: Path, n: int, seed: int = 0) -> None:
    """A prepared-dataset folder (manifest, labels, lists/val.txt and train.txt) with n masks and one CAM shard."""
    from wsss_core.data.io import write_label_png
    from wsss_core.store.atomic import write_json
    from wsss_core.store.shards import ShardWriter

    rng = np.random.default_rng(seed)
    masks = root / "masks"
    masks.mkdir(parents=True)
    ids = [f"COCO_val2014_{i:012d}" for i in range(n)]
    labels = {}
    with ShardWriter(root / "cams.h5", "cams", {"split": "val", "shard": 0, "n_shards": 1}) as w:
        for i in ids:
            m = np.zeros((H, W), np.uint8)
            keys = sorted(set(rng.integers(1, C, rng.integers(1, 5)).tolist()))
            cams = []
            for k in keys:
                y, x = rng.integers(0, H - 60), rng.integers(0, W - 80)
                h, w_ = rng.integers(40, H - y), rng.integers(60, W - x)
                m[y:y + h, x:x + w_] = k
                cam = np.zeros((H, W), np.float32)
                cam[max(0, y - 10):y + h + 10, max(0, x - 10):x + w_ + 10] = rng.uniform(0.3, 1.0)
                cams.append(cam)
            write_label_png(masks / f"{i}.png", m)
            w.add_cams(i, np.asarray(keys), np.stack(cams))
            labels[i] = keys
    (root / "lists").mkdir()
    (root / "lists" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "lists" / "train.txt").write_text("".join(f"{i}\n" for i in ids[: max(1, n // 10)]))
    classes = ["background", *[f"c{k}" for k in range(1, C)]]
    write_json(root / "labels.json", {"classes": classes, "labels": labels})
    write_json(root / "manifest.json", {"name": "cocobench", "kind": "coco", "root": ".", "image_dir": "images",
                                        "mask_dir": "masks", "dirs_relative_to": "prepared", "classes": classes,
                                        "n_classes": C, "splits": {"val": n}})


CHILD = """
import json, resource, sys, time
from wsss_core.stages.evaluate import cam_scores
root = sys.argv[1]
cfg = {"thresholds": {"start": 0.0, "stop": 0.6, "step": 0.01}, "mean": "present", "search": "grid"}
t0 = time.perf_counter()
r = cam_scores(root, [root + "/cams.h5"], "train", "val", cfg, root + "/eval.json")
dt = time.perf_counter() - t0
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": dt,
                  "miou": r["scores"]["val"]["miou"], "t": r["threshold"]["value"]}))
"""


def run_eval(root: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"FAIL: eval_cams failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def direct_miou(root: Path, t: float, k: int = 50) -> tuple[float, list[str]]:
    """mIoU (present-class mean) of the first k val images at threshold t, computed directly with numpy."""
    from wsss_core.data.io import read_label_png
    from wsss_core.store.shards import ShardedStore

    ids = (root / "lists" / "val.txt").read_text().split()[:k]
    conf = np.zeros((C, C), np.int64)
    with ShardedStore([str(root / "cams.h5")], kind="cams") as store:
        for i in ids:
            keys, cams = store[i]
            gt = read_label_png(root / "masks" / f"{i}.png")
            scores = np.concatenate([np.full((1, H, W), t, np.float32), cams.astype(np.float32)])
            pred = np.asarray([0, *keys])[scores.argmax(0)]
            conf += np.bincount(gt.ravel().astype(np.int64) * C + pred.ravel(), minlength=C * C).reshape(C, C)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan))), ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs=2, default=[500, 2000], help="the two image counts")
    args = ap.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            root = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            make_data(root, n)
            made = time.perf_counter() - t0
            runs[n] = {**run_eval(root), "make_s": made}
            print(f"N={n}: peak {runs[n]['peak_kb'] / 1024:.0f} MB, eval {runs[n]['seconds']:.0f} s "
                  f"(data made in {made:.0f} s)")
        small, big = args.n
        # the guard's direct check: the first 50 images alone, through the stage and directly
        check = Path(tmp) / "check"
        make_data(check, 50)
        r = run_eval(check)
        want, _ = direct_miou(check, r["t"])
    grow_mb = (runs[big]["peak_kb"] - runs[small]["peak_kb"]) / 1024
    same = abs(r["miou"] - want) < 1e-9
    ok = grow_mb <= 64 and same
    rec = result("10", f"Evaluation memory: eval_cams peak RSS, {small:,} vs {big:,} COCO-sized (480x640, 81-class) "
                       "images", "peak flat in N (≤ +64 MB), same mIoU as a direct computation",
                 f"{runs[small]['peak_kb'] / 1024:.0f} MB at N={small:,}",
                 f"{runs[big]['peak_kb'] / 1024:.0f} MB at N={big:,}", grow_mb, ok,
                 baseline_what="the same stage on fewer images", ours_what="wsss_core.stages.evaluate.cam_scores "
                 "(ThresholdCurve, one image at a time, fresh process)",
                 unit_note="ratio = growth of the peak in MB", details={"runs": runs, "direct_check": {
                     "stage_miou": r["miou"], "direct_miou": want, "n": 50}},
                 data="synthetic COCO-sized masks and CAMs")
    rec["ratio_fmt"] = "{:+.0f} MB"
    write_result(rec, "coco_eval")
    if not same:
        print(f"FAIL: stage mIoU {r['miou']} != direct {want}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
