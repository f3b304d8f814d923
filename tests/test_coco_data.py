"""Tests of the MS COCO 2014 data core (wsss_core.data.coco): class list, instances index, class masks, toy COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from wsss_core.data.coco import (COCO_CLASSES, COCO_HOWTO, CocoIndex, category_map, class_mask,
                                 classes_from_categories, coco_tree_problems, write_toy_coco)
from wsss_core.data.io import IGNORE_INDEX, read_label_png
from wsss_core.errors import DatasetError

X = IGNORE_INDEX
H, W = 10, 12  # the hand-written image: 10 rows, 12 columns

# Categories with non-contiguous ids -> classes 1..4 in id order.
CATS = [{"id": 9, "name": "delta", "supercategory": "s"}, {"id": 1, "name": "alpha", "supercategory": "s"},
        {"id": 5, "name": "beta", "supercategory": "s"}, {"id": 7, "name": "gamma", "supercategory": "s"}]

# B: uncompressed RLE (column-major runs, zeros first), category 1 -> class 1, rows 4..7 x cols 5..9:
#    54 = 5 columns * 10 + 4 zeros, then 5 x (4 ones, 6 zeros) with the last zero run 2 + 2 columns * 10 = 22.
ANN_B = {"id": 11, "image_id": 100, "category_id": 1, "iscrowd": 0, "area": 20.0, "bbox": [5.0, 4.0, 5.0, 4.0],
         "segmentation": {"counts": [54, 4, 6, 4, 6, 4, 6, 4, 6, 4, 22], "size": [H, W]}}
# A: polygon, category 5 -> class 2: the rectangle x in [1, 7), y in [1, 6) in pixel-corner coordinates, i.e.
#    pycocotools takes the pixels whose centre is inside: columns 1..6, rows 1..5 (half-open: x = 7, y = 6 are not).
ANN_A = {"id": 12, "image_id": 100, "category_id": 5, "iscrowd": 0, "area": 30.0, "bbox": [1.0, 1.0, 6.0, 5.0],
         "segmentation": [[1, 1, 7, 1, 7, 6, 1, 6]]}
# C: compressed RLE, category 7 -> class 3: rows 7..8 x cols 3..6 (pycocotools.mask.encode of that rectangle).
ANN_C = {"id": 13, "image_id": 100, "category_id": 7, "iscrowd": 0, "area": 8.0, "bbox": [3.0, 7.0, 4.0, 2.0],
         "segmentation": {"counts": "U12800000[1", "size": [H, W]}}
# Crowd: uncompressed RLE, category 9 -> class 4 (no other instance of it), rows 0..2 x cols 5..10:
#    50 zeros, 6 x (3 ones, 7 zeros) with the last zero run 7 + 10 = 17.
ANN_CROWD = {"id": 900100000100, "image_id": 100, "category_id": 9, "iscrowd": 1, "area": 18.0,
             "bbox": [5.0, 0.0, 6.0, 3.0],
             "segmentation": {"counts": [50, 3, 7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 17], "size": [H, W]}}
ANNS = [ANN_B, ANN_A, ANN_C, ANN_CROWD]  # file order

# crowd="ignore", overlap="later": crowd 255 first, then B, A (over B and over the crowd), C (over B)
EXPECTED = np.array([
    [0, 0, 0, 0, 0, X, X, X, X, X, X, 0],
    [0, 2, 2, 2, 2, 2, 2, X, X, X, X, 0],
    [0, 2, 2, 2, 2, 2, 2, X, X, X, X, 0],
    [0, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0],
    [0, 2, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0],
    [0, 2, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 3, 3, 3, 3, 1, 1, 1, 0, 0],
    [0, 0, 0, 3, 3, 3, 3, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
], dtype=np.uint8)

CAT_MAP = {1: 1, 5: 2, 7: 3, 9: 4}


def _instances(tmp_path: Path) -> Path:
    """A hand-written instances file: image 100 (the 4 annotations), image 200 (none), image 300 (a crowd only)."""
    crowd_only = {**ANN_CROWD, "id": 900100000300, "image_id": 300}
    doc = {"info": {"description": "hand-written"}, "licenses": [],
           "images": [{"id": 200, "file_name": "COCO_val2014_000000000200.jpg", "height": H, "width": W},
                      {"id": 100, "file_name": "COCO_val2014_000000000100.jpg", "height": H, "width": W},
                      {"id": 300, "file_name": "COCO_val2014_000000000300.jpg", "height": H, "width": W}],
           "annotations": [ANN_B, crowd_only, ANN_A, ANN_C, ANN_CROWD], "categories": CATS}
    p = tmp_path / "instances_val2014.json"
    p.write_text(json.dumps(doc))
    return p


# ------------------------------------------------------------------------------------------- class_mask

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0.x decode under numpy 2
def test_polygon_rasterization_is_half_open():
    from pycocotools import mask as mask_utils

    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ANN_A["segmentation"], H, W)))
    want = np.zeros((H, W), np.uint8)
    want[1:6, 1:7] = 1  # rows 1..5, columns 1..6
    np.testing.assert_array_equal(m, want)
    c = mask_utils.decode(ANN_C["segmentation"])
    want = np.zeros((H, W), np.uint8)
    want[7:9, 3:7] = 1
    np.testing.assert_array_equal(c, want)


def test_class_mask_every_pixel():
    np.testing.assert_array_equal(class_mask(H, W, ANNS, CAT_MAP), EXPECTED)


def test_class_mask_overlap_smaller():
    got = class_mask(H, W, ANNS, CAT_MAP, overlap="smaller")  # A (30 px), B (20 px), C (8 px): B over A
    want = EXPECTED.copy()
    want[4:6, 5:7] = 1
    np.testing.assert_array_equal(got, want)


def test_class_mask_crowd_class():
    got = class_mask(H, W, ANNS, CAT_MAP, crowd="class")  # the crowd is the last instance: over A, class 4
    want = EXPECTED.copy()
    want[0:3, 5:11] = 4
    np.testing.assert_array_equal(got, want)
    # smaller: crowd (18 px) over A (30) and B (20) over A
    got = class_mask(H, W, ANNS, CAT_MAP, crowd="class", overlap="smaller")
    want[4:6, 5:7] = 1
    np.testing.assert_array_equal(got, want)


def test_class_mask_errors():
    with pytest.raises(DatasetError, match="annotation 12: category id 5"):
        class_mask(H, W, ANNS, {1: 1, 7: 3, 9: 4})
    bad = {**ANN_B, "segmentation": {**ANN_B["segmentation"], "size": [H, W + 1]}}
    with pytest.raises(DatasetError, match="annotation 11: its RLE is 10x13"):
        class_mask(H, W, [bad], CAT_MAP)
    with pytest.raises(DatasetError, match="annotation 13: its RLE is 10x12"):
        class_mask(H + 1, W, [ANN_C], CAT_MAP)
    short = {**ANN_B, "segmentation": {"counts": [54, 4, 6], "size": [H, W]}}
    with pytest.raises(DatasetError, match="sum to 64"):
        class_mask(H, W, [short], CAT_MAP)
    assert class_mask(H, W, [], CAT_MAP).sum() == 0
    assert class_mask(H, W, [{**ANN_A, "segmentation": [[1, 1, 7, 1]]}], CAT_MAP).sum() == 0  # < 3 points


# ------------------------------------------------------------------------------------------- categories

def test_category_map_and_classes():
    assert category_map(CATS, expected=None) == CAT_MAP
    assert category_map([(c["id"], c["name"]) for c in CATS], expected=None) == CAT_MAP
    assert classes_from_categories(CATS) == ["background", "alpha", "beta", "gamma", "delta"]
    assert category_map(CATS, expected=("background", "alpha", "beta", "gamma", "delta")) == CAT_MAP
    with pytest.raises(DatasetError, match=r"class 2: category 5 'beta' != expected 'gamma'"):
        category_map(CATS, expected=("background", "alpha", "gamma", "beta", "delta"))
    with pytest.raises(DatasetError, match="4 categories in the file, 80 expected"):
        category_map(CATS)


def test_coco_classes_real_category_names():
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[:4] == ("background", "person", "bicycle", "car")
    assert COCO_CLASSES[80] == "toothbrush"
    # the instances files spell some names with a space and skip some ids (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
    gaps = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    ids = [i for i in range(1, 91) if i not in gaps]
    cats = [{"id": i, "name": n.replace("_", " ")} for i, n in zip(ids, COCO_CLASSES[1:])]
    cm = category_map(list(reversed(cats)))
    assert cm[1] == 1 and cm[13] == 12 and cm[90] == 80 and sorted(cm.values()) == list(range(1, 81))
    assert classes_from_categories(cats) == list(COCO_CLASSES)


def test_coco_classes_match_labels_coco_txt():
    p = shared_path("data", "coco14_lists", "labels_coco.txt")
    rows = [line.split() for line in p.read_text().splitlines() if line.strip()]
    assert [int(r[0]) for r in rows] == list(range(81))
    assert tuple(r[1] for r in rows) == COCO_CLASSES


# ------------------------------------------------------------------------------------------- CocoIndex

def test_index(tmp_path):
    idx = CocoIndex.load(_instances(tmp_path))
    assert idx.n_images == 3
    assert idx.categories == [(1, "alpha"), (5, "beta"), (7, "gamma"), (9, "delta")]
    assert idx.stems() == ["COCO_val2014_000000000100", "COCO_val2014_000000000300"]  # 200 has no annotation
    assert idx.size("COCO_val2014_000000000200") == (H, W) and idx.annotations("COCO_val2014_000000000200") == []
    assert idx.file_name("COCO_val2014_000000000100") == "COCO_val2014_000000000100.jpg"
    anns = idx.annotations("COCO_val2014_000000000100")
    assert [a["id"] for a in anns] == [11, 12, 13, 900100000100]  # file order, crowd id beyond int32
    assert anns[1]["bbox"] == [1.0, 1.0, 6.0, 5.0] and anns[3]["iscrowd"] == 1
    cm = category_map(idx.categories, expected=None)
    assert idx.labels("COCO_val2014_000000000100", cm) == [1, 2, 3, 4]
    assert idx.labels("COCO_val2014_000000000300", cm) == [4]  # the crowd's category counts
    np.testing.assert_array_equal(class_mask(H, W, anns, cm), EXPECTED)
    with pytest.raises(DatasetError, match="COCO_val2014_000000000999"):
        idx.size("COCO_val2014_000000000999")


def test_index_bad_files(tmp_path):
    missing = tmp_path / "annotations" / "instances_train2014.json"
    with pytest.raises(DatasetError, match="not found: .*instances_train2014.json.*annotations_trainval2014.zip"):
        CocoIndex.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"invalid COCO instances file .*bad\.json.*cocodataset\.org"):
        CocoIndex.load(bad)
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"bad\.json.*'annotations'"):
        CocoIndex.load(bad)
    doc = json.loads(_instances(tmp_path).read_text())
    doc["annotations"][0]["category_id"] = 4
    bad.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"bad\.json: annotation 11 has category id 4"):
        CocoIndex.load(bad)


def test_tree_problems(tmp_path):
    assert "COCO root folder not found" in coco_tree_problems(tmp_path / "nope")[0]
    (tmp_path / "train2014").mkdir()
    (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(b"x")
    probs = coco_tree_problems(tmp_path)
    assert any(str(tmp_path / "val2014") in p for p in probs)
    assert any("instances_train2014.json" in p for p in probs) and probs[-1] == COCO_HOWTO
    assert not any("train2014 holds no" in p for p in probs)


# ------------------------------------------------------------------------------------------- toy COCO

@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory):
    from wsss_core.data.toy import make_toy_dataset

    base = tmp_path_factory.mktemp("toycoco")
    make_toy_dataset(base / "coco" / "toy", seed=3, image_size=48, n_train_aug=6, n_train=2, n_val=4)
    return base, write_toy_coco(base / "coco" / "toy", base / "coco", seed=0)  # the toy inside: as the stage does


def test_toy_coco_layout_and_determinism(toy_coco, tmp_path):
    base, summary = toy_coco
    root = base / "coco"
    assert (root / "toy" / "classes.txt").is_file()  # other entries of out_root stay
    assert not coco_tree_problems(root)
    again = write_toy_coco(root / "toy", tmp_path / "again", seed=0)
    for split in ("train2014", "val2014"):
        name = f"annotations/instances_{split}.json"
        assert (root / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
        names = [sorted(p.name for p in (r / split).iterdir()) for r in (root, tmp_path / "again")]
        assert names[0] == names[1]
    assert {k: v for k, v in again.items() if k != "root"} == {k: v for k, v in summary.items() if k != "root"}


def test_toy_coco_reads_back(toy_coco):
    from skimage.measure import label as cc_label

    base, summary = toy_coco
    assert summary["category_ids"] == [1, 3, 4, 7, 9] and summary["crowd"] >= 1
    assert all(summary["encodings"][e] > 0 for e in ("polygon", "rle", "compressed_rle"))
    seen = set()
    for split in ("train2014", "val2014"):
        info = summary["splits"][split]
        idx = CocoIndex.load(base / "coco" / "annotations" / f"instances_{split}.json")
        cm = category_map(idx.categories, expected=None)
        assert classes_from_categories(idx.categories) == summary["classes"]
        assert idx.n_images == info["images"] == len(info["ids"]) + 2
        assert idx.stems() == sorted(info["ids"].values())  # the 2 empty images are dropped
        assert not set(info["empty"]) & set(idx.stems())
        agree = total = 0
        for toy_id, stem in info["ids"].items():
            assert (base / "coco" / split / idx.file_name(stem)).is_file()
            toy = read_label_png(base / "coco" / "toy" / "SegmentationClass" / f"{toy_id}.png")
            toy = np.where(toy == IGNORE_INDEX, 0, toy)  # the toy's boundary band belongs to no instance
            anns = idx.annotations(stem)
            got = class_mask(*idx.size(stem), anns, cm)
            outside = got != IGNORE_INDEX
            agree += int((got[outside] == toy[outside]).sum())
            total += int(outside.sum())
            assert idx.labels(stem, cm) == sorted(set(np.unique(toy).tolist()) - {0})
            for a in anns:
                seg = a["segmentation"]
                kind = "polygon" if isinstance(seg, list) else "compressed_rle" if isinstance(
                    seg["counts"], str) else "rle"
                seen.add("crowd" if a["iscrowd"] else kind)
                if kind != "polygon":  # an RLE instance is exactly one 4-connected component of its class
                    m = class_mask(*idx.size(stem), [a], cm, crowd="class") > 0
                    lab = cc_label(toy == cm[a["category_id"]], connectivity=1)
                    k = np.unique(lab[m])
                    assert len(k) == 1 and k[0] > 0 and (m == (lab == k[0])).all()
                    assert (got[m] == (IGNORE_INDEX if a["iscrowd"] else cm[a["category_id"]])).all()
        assert agree >= 0.95 * total
    assert seen == {"polygon", "rle", "compressed_rle", "crowd"}
