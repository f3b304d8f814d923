"""Item 2, evaluation: mIoU over a 60-threshold background curve (0.00 .. 0.59) on the 1,464 real VOC train masks
(SegmentationClassAug from ../shared; toy masks when absent) with synthetic CAMs (:func:`common.synth_cams`).

- baseline (the reference style of PSA/SEAM/PPC ``eval.py --curve``): per threshold, per image: a (21, H, W) score
  tensor (bg plane = the threshold, the present classes' CAMs), argmax, then per class a Python loop summing
  ``pred == c``, ``gt == c`` and the hits over the valid pixels. It costs ~1 s per image, so it runs on an evenly
  spaced subset of the images (``--baseline-images``) and its time is per image.
- baseline 2 (IRN/SIPE ``eval_cam`` style, chainercv's confusion): per threshold a label map and one bincount per
  image (``cam_to_labels`` + ``ConfusionMatrix``), on the same subset.
- ours: :class:`wsss_core.metrics.ThresholdCurve`: one pass per image (max / first argmax per channel, the number of
  thresholds below each pixel's score, one bincount), all 60 matrices by a cumulative sum at the end; run on all
  images (time per image = total / images, incl. the final ``result()``).
- guard: on the subset the TP / T / P counts of every class and threshold are identical to the baseline's, and both
  baselines and ours give identical mIoU curves; else exit 1.

    python bench/bench_eval.py [--images 1464] [--baseline-images 24]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from common import Stopwatch, load_voc_masks, result, synth_cams, write_result

from wsss_core.metrics import DEFAULT_THRESHOLDS, ConfusionMatrix, ThresholdCurve, cam_to_labels

N_CLASSES = 21


def reference_counts(items, thresholds, n: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP, T, P) int64 (J, n) in the PSA/SEAM eval.py style: per threshold and image an argmax over the full
    (n, H, W) score tensor with the threshold as the bg plane, then per-class Python loops."""
    j_n = len(thresholds)
    tp, t_, p_ = (np.zeros((j_n, n), np.int64) for _ in range(3))
    for j, thr in enumerate(thresholds):
        for gt, keys, cams in items:
            scores = np.zeros((n,) + gt.shape, np.float32)
            scores[keys] = cams
            scores[0] = thr
            pred = scores.argmax(axis=0)
            cal = gt < 255
            hit = (pred == gt) & cal
            for c in range(n):
                p_[j, c] += np.sum((pred == c) & cal)
                t_[j, c] += np.sum((gt == c) & cal)
                tp[j, c] += np.sum((gt == c) & hit)
    return tp, t_, p_


def miou_from_counts(tp, t_, p_) -> np.ndarray:
    """(J,) mean IoU over the classes with a non-empty union (the project's ``miou``)."""
    union = t_ + p_ - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return np.nanmean(iou, axis=1)


def bincount_curve(items, thresholds) -> list[float]:
    """mIoU per threshold, IRN/SIPE style: per threshold a hard label map and a bincount confusion per image."""
    out = []
    for t in thresholds:
        conf = ConfusionMatrix(N_CLASSES)
        for gt, keys, cams in items:
            conf.update(gt, cam_to_labels(cams, keys, t))
        out.append(conf.scores()["miou"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1464)
    ap.add_argument("--baseline-images", type=int, default=24)
    args = ap.parse_args(argv)
    thresholds = DEFAULT_THRESHOLDS
    ids, masks, source = load_voc_masks(args.images, "train_voc")
    n = len(masks)
    print(f"{n} masks: {source}")

    # ours, on every image (CAMs synthesised on the fly, outside the timed part)
    sw = Stopwatch()
    curve = ThresholdCurve(N_CLASSES, thresholds)
    step = max(1, n // max(1, args.baseline_images))
    subset_idx = list(range(0, n, step))[: args.baseline_images]
    subset = []
    for i, gt in enumerate(masks):
        keys, cams = synth_cams(gt, i)
        with sw:
            curve.update(gt, cams, keys)
        if i in subset_idx:
            subset.append((gt, keys, cams))
    with sw:
        res = curve.result()
    t_ours = sw.seconds / n

    # the same subset through ours (for the equality check) and the two baselines
    sub_curve = ThresholdCurve(N_CLASSES, thresholds)
    for gt, keys, cams in subset:
        sub_curve.update(gt, cams, keys)
    sw_ref = Stopwatch()
    with sw_ref:
        tp, t_, p_ = reference_counts(subset, thresholds)
    t_ref = sw_ref.seconds / len(subset)
    sw_bc = Stopwatch()
    with sw_bc:
        bc = bincount_curve(subset, thresholds)
    t_bc = sw_bc.seconds / len(subset)

    mats = sub_curve._all_full()  # (J, n, n + 1): the last column = invalid predictions (none here)
    ok = (np.array_equal(np.stack([np.diag(m[:, :N_CLASSES]) for m in mats]), tp)
          and np.array_equal(mats.sum(axis=2), t_) and np.array_equal(mats[:, :, :N_CLASSES].sum(axis=1), p_))
    ref_miou = miou_from_counts(tp, t_, p_)
    ours_sub = np.array(sub_curve.result()["miou"], dtype=np.float64)
    ok = ok and np.allclose(ours_sub, ref_miou, rtol=0, atol=1e-12) and np.allclose(ours_sub, bc, rtol=0, atol=1e-12)
    if not ok:
        print("FAIL: ThresholdCurve counts / mIoU differ from the reference loop", file=sys.stderr)
        return 1

    ratio = t_ref / t_ours
    met = ratio >= 20
    print(f"ours {t_ours * 1e3:.1f} ms/image on {n} images; reference loop {t_ref * 1e3:.0f} ms/image, "
          f"bincount loop {t_bc * 1e3:.0f} ms/image on {len(subset)}; x{ratio:.0f} / x{t_bc / t_ours:.1f}")
    details = {"images": n, "baseline_images": len(subset), "thresholds": len(thresholds),
               "ours_total_s": sw.seconds, "ours_ms_per_image": t_ours * 1e3, "baseline_ms_per_image": t_ref * 1e3,
               "bincount_loop_ms_per_image": t_bc * 1e3, "speedup_vs_bincount_loop": t_bc / t_ours,
               "best_t": res["best_t"], "best_miou": res["best_miou"], "counts_identical": True,
               "note": "CAMs are synthetic, so the mIoU values only check equality, not quality"}
    rec = result("2", "Evaluation: mIoU + 60-threshold curve", "≥ 20x, identical numbers",
                 f"{t_ref * 1e3:.0f} ms/image ({len(subset)} images)", f"{t_ours * 1e3:.1f} ms/image ({n} images)",
                 ratio, met, baseline_what="per threshold: (21,H,W) argmax + per-class Python loop (PSA/SEAM eval.py)",
                 ours_what="ThresholdCurve: one pass + one bincount per image for all thresholds",
                 reason="" if met else f"x{ratio:.1f} < 20", details=details, data=source)
    rec["ratio_fmt"] = "{:.0f}x"
    rec2 = result("2b", "Evaluation vs a bincount-per-threshold loop", "(info)",
                  f"{t_bc * 1e3:.0f} ms/image ({len(subset)} images)", f"{t_ours * 1e3:.1f} ms/image ({n} images)",
                  t_bc / t_ours, True, baseline_what="per threshold: cam_to_labels + ConfusionMatrix (IRN/SIPE style)",
                  ours_what="ThresholdCurve", details={}, data=source)
    rec2["ratio_fmt"] = "{:.0f}x"
    write_result([rec, rec2], "eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
