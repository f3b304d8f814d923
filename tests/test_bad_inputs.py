"""Bad input gives one clear error naming the file (or config key) and the fix, at DAG time where possible, and
nothing that looks complete is written.

Where each case is caught (DAG = while Snakemake builds the DAG, in rules/common.smk; job = in the job, before it
writes anything):

1. missing dataset root / id list: DAG (tests/test_pipeline_dag.py; here: the optional test list)
2. listed id without an image: job prepare_dataset
3. corrupt JPEG: job prepare_dataset (decodes every listed image); later readers name the file too
4. mask values outside 0..C-1/255: job prepare_dataset
5. cls_labels that disagree with the masks: job prepare_dataset (error beyond a tolerance, else a warning)
6. unknown or mistyped config key / bad value: DAG (schema check with the dotted key and the file it is in)
7. missing weights file: DAG (tests/test_pipeline_dag.py for ResNet-38/DeiT; here a generic path);
   wrong-shape weights: job (load_weights)
8. saliency folder missing some ids: job saliency (a folder that does not exist: DAG, tests/test_pipeline_dag.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_snakemake, write_yaml

from wsss_core.data.datasets import ClassificationDataset
from wsss_core.data.io import read_image, read_label_png, write_label_png
from wsss_core.data.prepare import VOC_CLASSES, prepare_dataset
from wsss_core.data.toy import make_toy_dataset
from wsss_core.errors import DataError, DatasetError, WeightsError


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


def _voc_toy(tmp_path: Path, saliency: bool = False) -> tuple[Path, dict]:
    """A tiny VOC-shaped tree (toy images and masks, classes 1..3 = aeroplane..bird) and its ``datasets.voc``
    settings: no test split, masks in SegmentationClass."""
    root = tmp_path / "VOC"
    make_toy_dataset(root, seed=1, image_size=32, n_train_aug=8, n_train=4, n_val=4, n_classes=3)
    seg = "ImageSets/Segmentation"
    ds = {"kind": "voc", "root": str(root), "mask_dir": "SegmentationClass",
          "lists": {s: f"{seg}/{s}.txt" for s in ("train_aug", "train", "val")},
          "splits": {"train": "train_aug", "threshold": "train", "mask_eval": "train", "eval": "val", "test": None}}
    if saliency:
        ds["saliency"] = {"dir": str(tmp_path / "SAL")}
    return root, ds


def _ids(root: Path, split: str = "train_aug") -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def _out(proc) -> str:
    return proc.stdout + proc.stderr


def _nothing_under(folder: Path) -> list[str]:
    """Files under ``folder`` (none expected after a failed job; temporary files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


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
    msg = str(err.value)
    assert "17" in msg and str(mask_path) in msg and "outside 0..3 and 255" in msg
    assert "Fix: regenerate the toy dataset" in msg and "or remove these ids from" in msg and "train_aug.txt" in msg
    assert _nothing_under(out) == []


def test_missing_image_is_named(toy, tmp_path):
    ids = (toy / "ImageSets/Segmentation/val.txt").read_text().split()
    (toy / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    with pytest.raises(DatasetError, match=ids[0]) as err:
        prepare_dataset(_ds(toy), "toy", tmp_path / "prepared")
    msg = str(err.value)
    assert str(toy / "JPEGImages" / f"{ids[0]}.jpg") in msg and str(toy / "ImageSets/Segmentation/val.txt") in msg
    assert "Fix: put the images there" in msg and "remove these ids" in msg
    assert _nothing_under(tmp_path / "prepared") == []


def test_missing_image_fails_the_prepare_job_and_leaves_nothing(tmp_path):
    """End to end: the user sees the id, the path and the fix in the failed job's log; no output is left."""
    root, ds = _voc_toy(tmp_path)
    gone = _ids(root)[5]
    (root / "JPEGImages" / f"{gone}.jpg").unlink()
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": ds}})
    proc = run_snakemake(tmp_path, "results/voc/dataset/manifest.json", configfile=cfg, check=False, timeout=120)
    assert proc.returncode != 0
    out = _out(proc)
    assert "Error in rule prepare_dataset" in out
    assert f"1 of 12 listed images are missing from {root / 'JPEGImages'}: {gone} ({root / 'JPEGImages' / gone}.jpg)" in out
    assert "Fix: put the images there" in out
    assert _nothing_under(tmp_path / "results") == []


def test_corrupt_jpeg_is_caught_by_prepare_before_anything_is_written(toy, tmp_path):
    ids = _ids(toy)
    bad = toy / "JPEGImages" / f"{ids[1]}.jpg"
    bad.write_bytes(bad.read_bytes()[:-40])  # truncated: the header parses, decoding fails
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError, match="1 of 12 listed images are corrupt or unreadable") as err:
        prepare_dataset(_ds(toy), "toy", out, n_workers=1)
    msg = str(err.value)
    assert f"{ids[1]}: {bad} (OSError: image file is truncated" in msg
    assert "Fix: replace these files with valid JPEGs" in msg and "train_aug.txt" in msg
    assert _nothing_under(out) == []


def _cls_table(root: Path, ids: list[str], shift: int = 0, size: int = 20) -> dict:
    """cls_labels entries from the toy masks (class c -> column c-1), optionally with classes moved by ``shift``."""
    table = {}
    for i in ids:
        v = np.zeros(size, np.float32)
        for c in np.unique(read_label_png(root / "SegmentationClass" / f"{i}.png")):
            if 0 < c < 255:
                v[(int(c) - 1 + shift) % size] = 1
        table[i] = v
    return table


def test_cls_labels_that_disagree_with_the_masks_are_an_error(tmp_path):
    root, ds = _voc_toy(tmp_path)
    ids = sorted(set(_ids(root)) | set(_ids(root, "val")))
    np.save(tmp_path / "cls_labels.npy", _cls_table(root, ids, shift=1))  # off by one class: every image wrong
    ds["cls_labels"] = str(tmp_path / "cls_labels.npy")
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError) as err:
        prepare_dataset(ds, "voc", out)
    msg = str(err.value)
    assert f"cls_labels file {tmp_path / 'cls_labels.npy'} (datasets.voc.cls_labels) disagrees with the masks" in msg
    assert "of 12 images with both, 12 lack a class their mask shows: " in msg and ids[0] in msg
    assert "12 name a class their mask does not show" in msg
    assert "Fix: regenerate cls_labels.npy" in msg and "set it to null) to derive the labels from the masks" in msg
    assert _nothing_under(out) == []


def test_cls_labels_of_the_wrong_shape_are_an_error(tmp_path):
    root, ds = _voc_toy(tmp_path)
    ids = _ids(root)
    np.save(tmp_path / "cls21.npy", _cls_table(root, ids, size=21))  # background included: 21-d
    ds["cls_labels"] = str(tmp_path / "cls21.npy")
    with pytest.raises(DatasetError, match=r"8 of 8 entries are not 20-d multi-hot vectors") as err:
        prepare_dataset(ds, "voc", tmp_path / "prepared")
    assert str(tmp_path / "cls21.npy") in str(err.value) and "shape (21,)" in str(err.value)
    assert "aeroplane..tvmonitor, background excluded" in str(err.value)
    assert _nothing_under(tmp_path / "prepared") == []


def test_cls_labels_with_a_few_extra_classes_warn_and_are_used(tmp_path, caplog):
    """XML-derived labels name objects the masks leave out (6.8 % of VOC train_aug + val): tolerated, with a
    warning naming the ids, and the counts in the manifest."""
    root, ds = _voc_toy(tmp_path)
    ids = sorted(set(_ids(root)) | set(_ids(root, "val")))
    table = _cls_table(root, ids)
    table[ids[2]][VOC_CLASSES.index("person") - 1] = 1  # one image of 12 names a class its mask lacks
    np.save(tmp_path / "cls_labels.npy", table)
    ds["cls_labels"] = str(tmp_path / "cls_labels.npy")
    with caplog.at_level("WARNING", logger="wsss"):
        man = prepare_dataset(ds, "voc", tmp_path / "prepared")
    assert f"1 name a class their mask does not show: {ids[2]} (cls_labels [" in caplog.text and "person]" in caplog.text
    assert man["cls_labels_check"]["extra_class"] == 1 and man["cls_labels_check"]["lacking_mask_class"] == 0
    labels = json.loads((tmp_path / "prepared" / "labels.json").read_text())["labels"]
    assert VOC_CLASSES.index("person") in labels[ids[2]]  # the file's labels are the ones used


def test_unknown_config_key_names_key_file_and_spelling(tmp_path):
    cfg = write_yaml(tmp_path / "typo.yaml", {"datasets": {"toy": {"stages": {"classifier": {"max_step": 3}}}},
                                             "stages": {"crf": {"bg_threshold": "autoo"}}})
    proc = run_snakemake(tmp_path, "-n", "toy_cam_report", configfile=cfg, check=False, timeout=120)
    assert proc.returncode != 0
    out = _out(proc)
    assert (f"unknown key datasets.toy.stages.classifier.max_step (set in {cfg}). Did you mean 'max_steps'? "
            "Keys allowed in datasets.toy.stages.classifier: ") in out
    assert f"stages.crf.bg_threshold (set in {cfg}): 'autoo' is not valid" in out
    assert "Fix: correct the spelling of an unknown key or remove it" in out
    assert "Failed validating" not in out  # one message, not the schema dump
    assert not (tmp_path / "results").exists()


def test_optional_test_list_and_missing_required_list_at_dag_time(tmp_path):
    """The VOC tree has no test list: fine with splits.test: null (as the message advises), an error naming the
    key and the fix otherwise; nothing is written either way."""
    root, ds = _voc_toy(tmp_path)
    ds["lists"]["test"] = "ImageSets/Segmentation/test.txt"
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": ds}})
    proc = run_snakemake(tmp_path, "-n", "results/voc/dataset/manifest.json", configfile=cfg, timeout=120)
    assert "prepare_dataset" in proc.stdout
    ds["splits"]["test"] = "test"
    cfg = write_yaml(tmp_path / "voc2.yaml", {"datasets": {"voc": ds}})
    proc = run_snakemake(tmp_path, "-n", "results/voc/dataset/manifest.json", configfile=cfg, check=False,
                         timeout=120)
    assert proc.returncode != 0
    assert (f"missing id list for split 'test' (datasets.voc.lists.test): {root / 'ImageSets/Segmentation/test.txt'} "
            "(or set datasets.voc.splits.test: null to do without the test split)") in _out(proc)
    assert not (tmp_path / "results").exists()


def test_wrong_shape_weights_name_file_key_shapes_and_fix(tmp_path):
    import torch
    from torch import nn

    from wsss_core.models.weights import load_weights

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"0.weight": torch.zeros(16, 3, 3, 3), "1.weight": torch.zeros(8)}}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(model, {"path": str(path)})
    msg = str(err.value)
    assert f"weights {path} do not fit the model: 1 of the 2 parameters they share have other shapes: " in msg
    assert "0.weight: file (16, 3, 3, 3) vs model (8, 3, 3, 3)" in msg
    assert "Fix: use the weights file made for this backbone" in msg and "backbone.weights: null" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


def test_missing_local_weights_are_named_at_dag_time(tmp_path):
    missing = tmp_path / "weights" / "my_resnet50.pth"
    cfg = write_yaml(tmp_path / "w.yaml", {"datasets": {"toy": {"stages": {"classifier": {"backbone": {
        "weights": {"path": str(missing)}}}}}}})
    proc = run_snakemake(tmp_path, "-n", "toy_cam_report", configfile=cfg, check=False, timeout=120)
    assert proc.returncode != 0
    out = _out(proc)
    assert f"pretrained weights not found: {missing}. Put the file there, set its path in config.yaml" in out
    assert "backbone.weights.path of this rule's stage" in out and "rule train_classifier" in out
    assert not (tmp_path / "results").exists()


def test_saliency_folder_missing_ids_fails_the_saliency_job_and_names_them(tmp_path):
    """End to end: prepare_dataset succeeds, the saliency job lists the missing maps (count, first ids, path) and
    leaves no saliency manifest."""
    root, ds = _voc_toy(tmp_path, saliency=True)
    ids = _ids(root)
    (tmp_path / "SAL").mkdir()
    for i in ids[:5]:
        (tmp_path / "SAL" / f"{i}.png").write_bytes(b"")
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": ds}})
    proc = run_snakemake(tmp_path, "results/voc/saliency/manifest.json", configfile=cfg, check=False, timeout=120)
    assert proc.returncode != 0
    out = _out(proc)
    assert "Error in rule saliency" in out
    assert (f"saliency folder {tmp_path / 'SAL'} (datasets.voc.saliency.dir) lacks 3 of the 8 maps of split(s) "
            f"train_aug (one <id>.png per image): {', '.join(ids[5:])}. Fix: add the missing maps (e.g. "
            f"{tmp_path / 'SAL' / ids[5]}.png)") in out
    assert (tmp_path / "results/voc/dataset/manifest.json").is_file()  # the dataset itself is fine
    assert _nothing_under(tmp_path / "results/voc/saliency") == []


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


def test_import_folder_missing_and_bad_references_are_named_at_dag_time(tmp_path):
    """An imported experiment whose folder does not exist, a compare_to naming no experiment, an import without
    CAMs: each stops the dry run with the key and the value."""
    theirs = {"label": "theirs", "refine": "import",
              "import": {"cams": {"dir": str(tmp_path / "no_cams"), "format": "psa"},
                         "pseudo_masks": {"dir": str(tmp_path / "no_masks")}}}
    cfg = write_yaml(tmp_path / "c.yaml", {"experiments": {"theirs": theirs},
                                           "suites": {"x": {"experiments": ["theirs"]}}})
    proc = run_snakemake(tmp_path, "-n", "toy_x_report", configfile=cfg, check=False, timeout=120)
    assert proc.returncode != 0
    assert "experiments.theirs.import.cams.dir" in _out(proc) and str(tmp_path / "no_cams") in _out(proc)
    bad = write_yaml(tmp_path / "d.yaml", {"experiments": {"ppc_fsae": {"compare_to": "ppcc"}}})
    proc = run_snakemake(tmp_path, "-n", "toy_fsae_report", configfile=bad, check=False, timeout=120)
    assert proc.returncode != 0 and "experiments.ppc_fsae.compare_to names 'ppcc'" in _out(proc)
    no_cams = write_yaml(tmp_path / "e.yaml", {"experiments": {"theirs": {"import": {"pseudo_masks": {"dir": "y"}},
                                                                          "refine": "import"}}})
    proc = run_snakemake(tmp_path, "-n", "toy_cam_report", configfile=no_cams, check=False, timeout=120)
    assert proc.returncode != 0 and "experiments.theirs has no method, so its CAMs must be imported" in _out(proc)
