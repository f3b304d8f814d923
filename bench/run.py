"""Benchmarks (not timed tests): each measures a wsss_core path against a plain baseline in the same run
and reports the ratio. Results go to bench/out/results.json and stdout.

    python bench/run.py [--images N]

- threshold_curve: ``ThresholdCurve`` (one bincount pass for all 60 thresholds) vs the plain reference
  loop (threshold, argmax, confusion matrix, once per threshold), on real VOC masks from
  ../shared/data when present (CAMs synthesised from the masks), else on toy masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsss_core.data.io import read_label_png  # noqa: E402
from wsss_core.metrics import ConfusionMatrix, ThresholdCurve, cam_to_labels  # noqa: E402

TARBALL = REPO.parent / "shared" / "data" / "voc12_SegmentationClassAug.tar.gz"


def load_masks(n: int, tmp: Path) -> tuple[list[np.ndarray], str]:
    if TARBALL.is_file():
        masks = []
        with tarfile.open(TARBALL) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".png"):
                    tar.extract(member, tmp, filter="data")
                    masks.append(read_label_png(tmp / member.name, 21))
                    if len(masks) == n:
                        break
        return masks, f"real VOC SegmentationClassAug masks ({TARBALL.name})"
    from wsss_core.data.toy import render_sample

    rng = np.random.default_rng(0)
    return [render_sample(rng, 128)[1] for _ in range(n)], "toy masks (../shared absent)"


def fake_cams(mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    keys = np.array(sorted(int(v) for v in np.unique(mask) if 0 < v < 255) or [1])
    cams = rng.random((len(keys),) + mask.shape, dtype=np.float32) * 0.4
    for k, c in enumerate(keys):
        cams[k][mask == c] += 0.5
    return np.clip(cams, 0, 1), keys


def bench_threshold_curve(masks, thresholds) -> dict:
    rng = np.random.default_rng(0)
    data = [(m, *fake_cams(m, rng)) for m in masks]
    t0 = time.perf_counter()
    curve = ThresholdCurve(21, thresholds)
    for gt, cams, keys in data:
        curve.update(gt, cams, keys)
    fast = curve.result()
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = []
    for t in thresholds:
        conf = ConfusionMatrix(21)
        for gt, cams, keys in data:
            conf.update(gt, cam_to_labels(cams, keys, t))
        plain.append(conf.scores()["miou"])
    t_plain = time.perf_counter() - t0
    assert np.allclose(fast["miou"], plain), "fast and plain curves disagree"
    return {"images": len(data), "thresholds": len(thresholds), "plain_s": t_plain, "wsss_core_s": t_fast,
            "speedup": t_plain / t_fast, "best_t": fast["best_t"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=100)
    args = ap.parse_args()
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        masks, source = load_masks(args.images, Path(tmp))
    thresholds = np.round(np.arange(0, 0.6, 0.01), 2)
    results = {"data": source, "threshold_curve": bench_threshold_curve(masks, thresholds)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    r = results["threshold_curve"]
    print(f"threshold curve on {r['images']} images ({source}), {r['thresholds']} thresholds: "
          f"plain loop {r['plain_s']:.2f} s, wsss_core {r['wsss_core_s']:.2f} s, speed-up x{r['speedup']:.1f}")


if __name__ == "__main__":
    main()
