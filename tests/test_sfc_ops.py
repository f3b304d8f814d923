"""SFC class-occurrence weights (``Barrett-python/SFC`` ``train_resnet50_SFC.py::train``), on the reference's counts
and on the real VOC labels."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path
from wsss_core.data.prepare import read_id_list
from wsss_core.methods.sfc_ops import class_counts, occurrence_weights

VOC_COUNTS = [590, 504, 705, 468, 714, 393, 1150, 1005, 1228, 267, 613, 1188, 445, 492, 4155, 522, 300, 649, 503, 567]
REFERENCE_WEIGHTS = [0.8065, 0.9025, 0.7726, 0.9809, 0.7732, 1.2084, 0.8725, 0.8318, 0.9068, 1.7694, 0.7929, 0.8870,
                     1.0424, 0.9259, 1.5451, 0.8765, 1.5955, 0.7801, 0.9042, 0.8257]


def test_weights_reproduce_the_reference_constants():
    n = np.array(VOC_COUNTS, dtype=float)
    ben = np.abs(n[:, None] - n[None, :]).sum(1)
    assert ben[14] == 66642 and ben[8] == 13956  # person, chair (the reference's hard-coded ``ben``)
    w = occurrence_weights(VOC_COUNTS)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w, REFERENCE_WEIGHTS, atol=6e-5)
    assert w.argmax() == 9 and w[14] > 1.5 and w[4] < 0.78  # U-shaped: cow (rare) and person (frequent) up


def test_weights_are_permutation_equivariant_and_reject_degenerate_counts():
    rng = np.random.default_rng(0)
    perm = rng.permutation(20)
    np.testing.assert_allclose(occurrence_weights(np.array(VOC_COUNTS)[perm]), occurrence_weights(VOC_COUNTS)[perm])
    with pytest.raises(ValueError):
        occurrence_weights([5, 5, 5])
    with pytest.raises(ValueError):
        occurrence_weights([3])


def test_counts_from_the_real_voc_train_aug_labels_match_the_reference():
    lists = shared_path("data", "voc12_lists")
    table = np.load(lists / "cls_labels_voc.npy", allow_pickle=True).item()
    ids = read_id_list(lists / "trainaug_voc.txt")  # PSA format: "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
    assert len(ids) == 10582
    counts = class_counts(np.stack([np.asarray(table[i], dtype=np.float32) for i in ids]))
    assert counts.tolist() == VOC_COUNTS
    np.testing.assert_allclose(occurrence_weights(counts), REFERENCE_WEIGHTS, atol=6e-5)
