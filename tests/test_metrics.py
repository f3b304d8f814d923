"""Tests of wsss_core.metrics: hand-computed IoUs, the 255 ignore label, threshold-curve semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsss_core.metrics import (
    DEFAULT_THRESHOLDS,
    ConfusionMatrix,
    ThresholdCurve,
    cam_to_labels,
    scores_from_confusion,
)

N = 21


# ----------------------------------------------------------------------------- 1. identity and hand values

def test_hand_values_two_classes():
    cm = ConfusionMatrix(N)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    s = cm.scores()
    assert s["iou"][0] == pytest.approx(1 / 2)
    assert s["iou"][1] == pytest.approx(2 / 3)
    assert all(v is None for v in s["iou"][2:])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["miou"] == pytest.approx(0.5833, abs=1e-4)
    assert s["miou_strict"] == pytest.approx((0.5 + 2 / 3) / 21)
    assert s["miou_strict"] == pytest.approx(0.0556, abs=1e-4)
    assert s["present"] == [True, True] + [False] * 19
    assert s["precision"][:2] == pytest.approx([1.0, 2 / 3])
    assert s["recall"][:2] == pytest.approx([0.5, 1.0])
    assert s["fp"][:2] == pytest.approx([0.0, 1 / 3])     # (P - TP) / union
    assert s["fn"][:2] == pytest.approx([0.5, 0.0])       # (T - TP) / union
    assert s["pixel_acc"] == pytest.approx(0.75)
    assert s["mean_acc"] == pytest.approx(0.75)
    assert s["fwiou"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert s["n_pixels"] == 4
    m = cm.matrix
    assert m.dtype == np.int64 and m.shape == (N, N)
    assert m[0, 0] == 1 and m[0, 1] == 1 and m[1, 1] == 2 and m.sum() == 4
    json.dumps(s, allow_nan=False)  # JSON-serialisable, no NaN


def test_identity_all_classes_both_means():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, N, size=(2, 40, 50)).astype(np.uint8)
    gt[0, :2, :N] = np.arange(N)  # all 21 classes surely present
    gt[1, 5:9, 7:20] = 255
    cm = ConfusionMatrix(N)
    for g in gt:
        cm.update(g, g)
    s = cm.scores(class_names=[f"c{i}" for i in range(N)])
    assert s["miou"] == 1.0 and s["miou_strict"] == 1.0
    assert s["pixel_acc"] == 1.0 and s["fwiou"] == pytest.approx(1.0)
    assert s["class_names"][3] == "c3"
    assert s["n_pixels"] == int((gt != 255).sum())


def test_scores_from_confusion_matches_and_validates():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1], [2, 2]]), np.array([[0, 2], [2, 1]]))
    assert scores_from_confusion(cm.matrix) == cm.scores()
    with pytest.raises(ValueError):
        scores_from_confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        cm.scores(class_names=["a", "b"])


def test_merge_and_int64():
    a, b, both = ConfusionMatrix(N), ConfusionMatrix(N), ConfusionMatrix(N)
    rng = np.random.default_rng(1)
    for cm_part in (a, b):
        gt = rng.integers(0, N, size=(30, 30))
        pred = rng.integers(0, N, size=(30, 30))
        cm_part.update(gt, pred)
        both.update(gt, pred)
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, both.matrix)
    assert a.matrix.dtype == np.int64
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(5))


def test_bad_gt_and_shapes_raise():
    cm = ConfusionMatrix(N)
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([0, 30]), np.array([0, 0]))
    with pytest.raises(ValueError, match="shapes"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError):
        cm.update(np.zeros(3, int), np.zeros(3, float))


def test_empty_is_serialisable():
    s = ConfusionMatrix(N).scores()
    assert s["miou"] is None and s["miou_strict"] == 0.0 and s["n_pixels"] == 0
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------- 2. ignore label

def test_predictions_at_ignored_pixels_do_not_matter():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, N, size=(60, 70)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, N, size=gt.shape).astype(np.uint8)
    pred2 = pred.copy()
    ign = gt == 255
    pred2[ign] = rng.integers(0, 256, size=int(ign.sum()))
    a, b = ConfusionMatrix(N), ConfusionMatrix(N)
    a.update(gt, pred)
    b.update(gt, pred2)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.invalid_pred, b.invalid_pred)
    assert a.scores() == b.scores()


def test_pred_255_on_valid_pixel():
    cm = ConfusionMatrix(N)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 255, 1, 1]))
    s = cm.scores()
    # T0 = 2 (the 255 prediction is an error for class 0), P0 = 1, TP0 = 1 -> 1/2; class 1 perfect
    assert s["iou"][0] == pytest.approx(0.5)
    assert s["iou"][1] == 1.0
    assert s["recall"][0] == pytest.approx(0.5) and s["precision"][0] == 1.0
    assert cm.matrix.sum() == 3           # added to no P_c
    assert cm.invalid_pred.tolist()[:2] == [1, 0]
    assert s["n_pixels"] == 4 and s["n_invalid_pred"] == 1
    assert s["pixel_acc"] == pytest.approx(3 / 4)
    # compared with a prediction of 0 there: class 0's IoU is lower
    ref = ConfusionMatrix(N)
    ref.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))
    assert ref.scores()["iou"][0] == 1.0 > s["iou"][0]


def _chainercv_style(gt, pred, n):
    """chainercv calc_semantic_segmentation_confusion: only gt >= 0 masked, grow, then slice [:n, :n]."""
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    mask = gt >= 0
    size = int(max(gt.max(), pred.max())) + 1
    conf = np.bincount(size * gt[mask] + pred[mask], minlength=size * size).reshape(size, size)
    return conf[:n, :n]


def _fast_hist(gt, pred, n):
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    mask = (gt >= 0) & (gt < n)
    return np.bincount(n * gt[mask] + pred[mask], minlength=n * n).reshape(n, n)


def test_chainercv_slice_and_fast_hist_agree():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, N, size=(50, 50)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = rng.integers(0, N, size=gt.shape).astype(np.uint8)
    cm = ConfusionMatrix(N)
    cm.update(gt, pred)
    np.testing.assert_array_equal(cm.matrix, _chainercv_style(gt, pred, N))
    np.testing.assert_array_equal(cm.matrix, _fast_hist(gt, pred, N))
    # With 255 predictions on valid pixels the sliced chainercv matrix still equals ours (n x n part).
    pred[rng.random(gt.shape) < 0.1] = 255
    cm2 = ConfusionMatrix(N)
    cm2.update(gt, pred)
    np.testing.assert_array_equal(cm2.matrix, _chainercv_style(gt, pred, N))


# ----------------------------------------------------------------------------- 3. curve semantics

def test_default_thresholds():
    assert DEFAULT_THRESHOLDS.shape == (60,)
    assert DEFAULT_THRESHOLDS[0] == 0.0 and DEFAULT_THRESHOLDS[17] == 0.17 and DEFAULT_THRESHOLDS[-1] == 0.59


def test_cam_to_labels_tie_goes_to_background():
    cams = np.full((1, 4, 5), 0.3, dtype=np.float32)
    keys = np.array([7])
    assert (cam_to_labels(cams, keys, 0.29) == 7).all()
    assert (cam_to_labels(cams, keys, 0.30) == 0).all()
    assert (cam_to_labels(cams, keys, np.float64(0.30)) == 0).all()   # cast to the CAM dtype
    assert (cam_to_labels(cams, keys, 0.31) == 0).all()
    out = cam_to_labels(cams, keys, 0.1)
    assert out.dtype == np.uint8 and out.shape == (4, 5)
    # K == 0: all background
    z = cam_to_labels(np.zeros((0, 3, 2), np.float32), np.zeros(0, int), 0.1)
    assert z.shape == (3, 2) and (z == 0).all()
    # argmax picks the key of the strongest channel, lower k on ties
    two = np.stack([np.full((2, 2), 0.5), np.full((2, 2), 0.5)]).astype(np.float32)
    two[1, 0, 0] = 0.9
    lab = cam_to_labels(two, np.array([3, 9]), 0.2)
    assert lab[0, 0] == 9 and lab[1, 1] == 3
    with pytest.raises(ValueError):
        cam_to_labels(two, np.array([9, 0]), 0.2)   # key 0 (a background map) may only come first
    # a leading background map (SIPE/SFC IS-CAM): at t = 0 the label is keys[argmax], bg included
    bg_first = cam_to_labels(two, np.array([0, 9]), 0.0)
    assert bg_first[0, 0] == 9 and bg_first[1, 1] == 0
    with pytest.raises(ValueError):
        cam_to_labels(two, np.array([3]), 0.2)


def test_curve_switch_at_030_and_smallest_best():
    gt = np.full((4, 5), 7, dtype=np.uint8)
    cams = np.full((1, 4, 5), 0.3, dtype=np.float32)
    curve = ThresholdCurve(N)
    curve.update(gt, cams, np.array([7]))
    r = curve.result()
    t = r["thresholds"]
    assert len(t) == 60
    i29, i30, i31 = t.index(0.29), t.index(0.30), t.index(0.31)
    assert r["miou"][i29] == 1.0
    assert r["miou"][i30] == 0.0 and r["miou"][i31] == 0.0
    assert curve.confusion_at(i29)[7, 7] == 20
    assert curve.confusion_at(i30)[7, 0] == 20      # exact tie -> background
    assert r["best_t"] == 0.0 and r["best_miou"] == 1.0   # smallest maximiser of the 0.00..0.29 plateau
    assert r["scores_at_best"]["iou"][7] == 1.0
    json.dumps(r, allow_nan=False)


def test_curve_best_t_inside_range():
    # bg pixels have CAM 0.2, fg pixels 0.5: perfect for 0.20 <= t < 0.50 (0.20 is a tie -> bg).
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = 12
    cams = np.where(gt == 12, 0.5, 0.2).astype(np.float32)[None]
    curve = ThresholdCurve(N)
    curve.update(gt, cams, np.array([12]))
    r = curve.result()
    assert r["best_t"] == 0.2 and r["best_miou"] == 1.0
    assert r["miou"][19] < 1.0 and r["miou"][20] == 1.0 and r["miou"][49] == 1.0 and r["miou"][50] < 1.0
    # selection by the strict mean picks the same threshold, with the SEAM-style value
    rs = curve.result(strict=True)
    assert rs["best_t"] == 0.2 and rs["best_miou"] == pytest.approx(2 / 21)


def test_curve_constant_for_label_map_input():
    """A png prediction does not depend on t: as one-hot CAMs the curve is flat and equals the plain score."""
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 4, size=(20, 20)).astype(np.uint8)
    pred = rng.integers(0, 4, size=(20, 20)).astype(np.uint8)
    keys = np.array([1, 2, 3])
    cams = np.stack([(pred == k).astype(np.float32) for k in keys])
    curve = ThresholdCurve(N)
    curve.update(gt, cams, keys)
    cm = ConfusionMatrix(N)
    cm.update(gt, pred)
    r = curve.result()
    assert len(set(r["miou"])) == 1 and r["miou"][0] == cm.scores()["miou"]
    assert r["best_t"] == 0.0


def _brute_force(images, n, thresholds):
    mats = []
    for t in thresholds:
        cm = ConfusionMatrix(n)
        for gt, cams, keys in images:
            cm.update(gt, cam_to_labels(cams, keys, float(t)))
        mats.append(cm)
    return mats


def _random_images(rng, n_images, n_classes, max_key):
    images = []
    for i in range(n_images):
        h, w = rng.integers(5, 30, size=2)
        k = int(rng.integers(0, 4)) if i else 0          # one image with K == 0
        keys = np.sort(rng.choice(np.arange(1, max_key + 1), size=k, replace=False)).astype(np.int64)
        cams = rng.random((k, h, w)) * 0.7
        # put many values exactly on the threshold grid (as float32) to exercise ties
        grid = rng.random((k, h, w)) < 0.3
        cams[grid] = np.round(cams[grid], 2)
        cams = cams.astype(np.float32 if i % 2 == 0 else np.float64)
        gt = rng.integers(0, n_classes, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        images.append((gt, cams, keys))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_curve_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    images = _random_images(rng, 6, N, N - 1)
    curve = ThresholdCurve(N)
    for gt, cams, keys in images:
        curve.update(gt, cams, keys)
    mats = _brute_force(images, N, curve.thresholds)
    r = curve.result()
    for j, cm in enumerate(mats):
        np.testing.assert_array_equal(curve.confusion_at(j), cm.matrix)
        s = cm.scores()
        assert r["miou"][j] == s["miou"] and r["miou_strict"][j] == s["miou_strict"]
    best = int(np.argmax([m if m is not None else -1 for m in r["miou"]]))
    assert r["best_t"] == float(curve.thresholds[best])
    assert r["scores_at_best"] == mats[best].scores()


def test_curve_equals_brute_force_invalid_keys_and_custom_thresholds():
    """Keys >= n_classes count as invalid predictions in both paths; non-default thresholds."""
    rng = np.random.default_rng(10)
    n = 5
    images = _random_images(rng, 5, n, 8)
    thr = np.array([0.0, 0.05, 0.1, 0.25, 0.3, 0.33, 0.5, 0.69])
    curve = ThresholdCurve(n, thresholds=thr)
    half = ThresholdCurve(n, thresholds=thr)
    for i, (gt, cams, keys) in enumerate(images):
        curve.update(gt, cams, keys)
        if i % 2:
            half.update(gt, cams, keys)
    mats = _brute_force(images, n, thr)
    for j, cm in enumerate(mats):
        np.testing.assert_array_equal(curve.confusion_at(j), cm.matrix)
        assert curve.result()["miou"][j] == cm.scores()["miou"]
    other = ThresholdCurve(n, thresholds=thr)
    for i, (gt, cams, keys) in enumerate(images):
        if i % 2 == 0:
            other.update(gt, cams, keys)
    half.merge(other)
    assert half.result() == curve.result()
    with pytest.raises(ValueError):
        ThresholdCurve(n, thresholds=[0.2, 0.1])
