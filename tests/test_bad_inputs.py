"""Bad input gives a clear error naming the file, and nothing that looks complete is written."""

from __future__ import annotations

import numpy as np
import pytest

from wsss_core.data.datasets import ClassificationDataset
from wsss_core.data.io import read_image, read_label_png, write_label_png
from wsss_core.data.prepare import prepare_dataset
from wsss_core.data.toy import make_toy_dataset
from wsss_core.errors import DataError, DatasetError


@pytest.fixture()
def toy(tmp_path):
    root = tmp_path / "toy"
    make_toy_dataset(root, seed=1, image_size=48, n_train_aug=8, n_train=4, n_val=4, n_classes=3)
    return root


def _ds(root):
    return {"kind": "toy", "root": str(root)}


def test_prepare_toy_writes_lists_labels_manifest(toy, tmp_path):
    out = tmp_path / "prepared"
    man = prepare_dataset(_ds(toy), "toy", out)
    assert man["splits"] == {"train_aug": 8, "train": 4, "val": 4}
    assert (out / "lists" / "val.txt").read_text().split() == sorted((toy / "ImageSets/Segmentation/val.txt").read_text().split())
    import json

    labels = json.loads((out / "labels.json").read_text())["labels"]
    # image-level labels are exactly the classes present in each mask
    for image_id, labs in labels.items():
        mask = read_label_png(toy / "SegmentationClass" / f"{image_id}.png")
        assert labs == sorted(int(v) for v in np.unique(mask) if 0 < v < 255)


def test_corrupt_jpeg_is_named(toy):
    ids = (toy / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    bad = toy / "JPEGImages" / f"{ids[2]}.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataError, match=ids[2]):
        read_image(bad)
    data = ClassificationDataset(toy / "JPEGImages", ids, np.zeros((len(ids), 3), np.float32), 48, [40, 56])
    data[0]  # a good image still loads
    with pytest.raises(DataError, match="corrupt"):
        data[2]


def test_mask_with_bad_values_is_named_and_nothing_is_written(toy, tmp_path):
    ids = (toy / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    mask_path = toy / "SegmentationClass" / f"{ids[3]}.png"
    mask = read_label_png(mask_path)
    mask[0, 0] = 17  # the toy dataset has classes 0..3 only
    write_label_png(mask_path, mask)
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError, match=ids[3]) as err:
        prepare_dataset(_ds(toy), "toy", out)
    assert "17" in str(err.value)
    assert not (out / "manifest.json").exists()


def test_missing_image_is_named(toy, tmp_path):
    ids = (toy / "ImageSets/Segmentation/val.txt").read_text().split()
    (toy / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    with pytest.raises(DatasetError, match=ids[0]):
        prepare_dataset(_ds(toy), "toy", tmp_path / "prepared")


def test_missing_voc_root_is_named(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    ds = {"kind": "voc", "root": str(root), "lists": {"train_aug": "a.txt", "train": "b.txt", "val": "c.txt"}}
    with pytest.raises(DatasetError, match="VOC2012") as err:
        prepare_dataset(ds, "voc", tmp_path / "prepared")
    assert "VOCtrainval" in str(err.value)


def test_rgb_mask_is_rejected(tmp_path):
    from PIL import Image

    p = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    with pytest.raises(DataError, match="single-channel"):
        read_label_png(p, 21)
