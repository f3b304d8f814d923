"""ConfusionMatrix on real VOC12 SegmentationClassAug masks vs an independent per-class count.

Skips when the shared tarball is absent.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from wsss_core.data.io import IGNORE_INDEX, read_label_png
from wsss_core.metrics import ConfusionMatrix

TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc12_SegmentationClassAug.tar.gz"
N = 21
N_FIRST = 40          # masks taken in tar order
MAX_SCAN = 2000       # further members scanned only to complete the 21-class coverage


@pytest.fixture(scope="module")
def voc_masks(tmp_path_factory):
    if not TARBALL.is_file():
        pytest.skip(f"real VOC masks not available: {TARBALL} is missing")
    out = tmp_path_factory.mktemp("voc_masks")
    masks, seen = [], set()
    with tarfile.open(TARBALL, mode="r|gz") as tf:          # stream; never extract the whole archive
        for i, member in enumerate(tf):
            if i > MAX_SCAN or (len(masks) >= N_FIRST and len(seen) == N):
                break
            if not (member.isfile() and member.name.endswith(".png")):
                continue
            data = tf.extractfile(member).read()
            path = out / Path(member.name).name
            path.write_bytes(data)
            mask = read_label_png(path, n_classes=N)
            classes = set(np.unique(mask).tolist()) - {IGNORE_INDEX}
            if len(masks) < N_FIRST or classes - seen:
                masks.append(mask)
                seen |= classes
    if len(masks) < N_FIRST:
        pytest.skip(f"only {len(masks)} masks found in {TARBALL}")
    return masks, seen


def perturb(mask: np.ndarray) -> np.ndarray:
    """Deterministic edits: a rectangle set to 15 (person), another to 255, a third to 3 (bird)."""
    p = mask.copy()
    h, w = p.shape
    p[h // 4: h // 4 + h // 5, w // 4: w // 4 + w // 5] = 15
    p[h // 2: h // 2 + h // 6, w // 2: w // 2 + w // 6] = 255
    p[: h // 8, -(w // 7):] = 3
    return p


def independent_iou(pairs, n):
    """Straightforward per-class loop with boolean masks (pure numpy, Python-int division)."""
    tp, t, p = [0] * n, [0] * n, [0] * n
    for gt, pred in pairs:
        valid = gt != 255
        for c in range(n):
            g = gt == c
            q = (pred == c) & valid
            tp[c] += int(np.count_nonzero(g & q))
            t[c] += int(np.count_nonzero(g))
            p[c] += int(np.count_nonzero(q))
    iou = [None if t[c] + p[c] - tp[c] == 0 else tp[c] / (t[c] + p[c] - tp[c]) for c in range(n)]
    return iou, tp, t, p


def test_masks_have_void_pixels(voc_masks):
    masks, _ = voc_masks
    n_void = sum(int((m == 255).sum()) for m in masks)
    assert n_void > 0
    assert all(m.dtype == np.uint8 and m.ndim == 2 for m in masks)


def test_gt_vs_gt_is_perfect(voc_masks):
    masks, seen = voc_masks
    cm = ConfusionMatrix(N)
    for m in masks:
        cm.update(m, m)
    s = cm.scores()
    assert s["miou"] == 1.0
    if seen == set(range(N)):
        assert s["miou_strict"] == 1.0
    else:  # coverage incomplete: absent classes count 0 in the strict mean
        assert s["miou_strict"] == pytest.approx(len(seen) / N)
    assert s["n_pixels"] == sum(int((m != 255).sum()) for m in masks)


def test_perturbed_equals_independent_count(voc_masks):
    masks, _ = voc_masks
    pairs = [(m, perturb(m)) for m in masks]
    cm = ConfusionMatrix(N)
    for gt, pred in pairs:
        cm.update(gt, pred)
    s = cm.scores()
    iou, tp, t, p = independent_iou(pairs, N)
    assert s["iou"] == iou                      # exact float equality per class
    m = cm.matrix
    assert np.diag(m).tolist() == tp
    assert (m.sum(axis=1) + cm.invalid_pred).tolist() == t
    assert m.sum(axis=0).tolist() == p
    assert s["n_invalid_pred"] > 0              # the 255 rectangle hit valid pixels
    assert 0.0 < s["miou"] < 1.0


def test_void_pixels_are_ignored(voc_masks):
    masks, _ = voc_masks
    rng = np.random.default_rng(0)
    a, b = ConfusionMatrix(N), ConfusionMatrix(N)
    for m in masks:
        pred = perturb(m)
        pred2 = pred.copy()
        void = m == 255
        pred2[void] = rng.integers(0, 256, size=int(void.sum()))
        a.update(m, pred)
        b.update(m, pred2)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.invalid_pred, b.invalid_pred)
    assert a.scores() == b.scores()
