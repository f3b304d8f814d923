"""Dataset preparation: layout checks, id lists, image-level labels and the manifest every later stage reads.

Outputs of :func:`prepare_dataset` (in ``out_dir``):

- ``lists/<split>.txt``: sorted ids per split (train_aug, train, val, ...);
- ``labels.json``: ``{"classes": [bg, ...], "labels": {id: [class labels 1..C-1]}}`` (image-level labels);
- ``manifest.json``: kind, absolute image/mask folders, class names, counts per split, images per class,
  sha256 of the lists and labels, where the labels came from.

Masks are only for evaluation; training stages read ``labels.json``.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DatasetError
from ..store.atomic import read_json, write_json, write_text
from .io import IGNORE_INDEX, read_label_png

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

VOC_HOWTO = ("Download VOCtrainval_11-May-2012.tar from the PASCAL VOC 2012 site and the SegmentationClassAug masks "
             "(SBD-augmented, e.g. the 'SegmentationClassAug.zip' distributed with DeepLab/PSA), extract them so that "
             "<root>/JPEGImages, <root>/SegmentationClassAug and <root>/ImageSets/Segmentation exist, add the "
             "train_aug id list (10,582 ids), and set datasets.voc.root in config.yaml. For the test-set "
             "submission, also extract VOC2012test.tar (1,456 images, registration on the VOC evaluation server) "
             "into the same tree, or set datasets.voc.splits.test: null.")

SALIENCY_HOWTO = (
    "Saliency maps are off-the-shelf salient-object maps, one <id>.png per training image. For PASCAL VOC, "
    "EPS/PPC use the PFAN/PoolNet maps distributed by the EPS authors (github.com/PengtaoJiang/EPS, "
    "'SALImages'): download and unpack them, then set datasets.<name>.saliency.dir to that folder."
)


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def voc_layout_problems(ds: Mapping[str, Any]) -> list[str]:
    """Cheap checks (no per-file work) of a VOC-style tree; each problem names the path. Used at DAG build time."""
    root = Path(ds["root"]).expanduser()
    if not root.is_dir():
        return [f"dataset root {root.resolve()} does not exist"]
    problems = []
    for sub in ("JPEGImages", ds.get("mask_dir", "SegmentationClassAug")):
        if not (root / sub).is_dir():
            problems.append(f"missing folder {(root / sub).resolve()}")
    for split, rel in ds["lists"].items():
        p = _resolve(root, rel)
        if not p.is_file():
            problems.append(f"missing id list for split {split!r}: {p.resolve()}")
    if ds.get("cls_labels") and not Path(ds["cls_labels"]).expanduser().is_file():
        problems.append(f"missing cls_labels file {Path(ds['cls_labels']).expanduser().resolve()}")
    return problems


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Read an id list: bare ids, or repo-style lines ``/JPEGImages/X.jpg /SegmentationClassAug/X.png``."""
    ids = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            tok = line.split()
            if not tok:
                continue
            first = tok[0]
            ids.append(Path(first).stem if "/" in first or first.endswith((".jpg", ".png")) else first)
    if len(set(ids)) != len(ids):
        raise DatasetError(f"id list {path} contains duplicate ids")
    return ids


def _labels_from_mask(args: tuple[str, str, int]) -> tuple[str, list[int] | None, str | None]:
    image_id, mask_path, n_classes = args
    if not os.path.isfile(mask_path):
        return image_id, None, None
    try:
        mask = read_label_png(mask_path, n_classes)
    except Exception as exc:  # reported together below
        return image_id, None, str(exc)
    vals = np.unique(mask)
    return image_id, [int(v) for v in vals if 0 < v < n_classes and v != IGNORE_INDEX], None


def _labels_from_xml(path: Path, classes: Sequence[str]) -> list[int]:
    names = {obj.findtext("name", "").strip() for obj in ET.parse(path).getroot().iter("object")}
    return sorted(classes.index(n) for n in names if n in classes)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_dataset(ds: Mapping[str, Any], dataset_name: str, out_dir: str | os.PathLike, n_workers: int = 1) -> dict:
    """Write lists, labels and manifest for dataset config ``ds`` (kind toy or voc); returns the manifest.

    Raises DatasetError naming the path for a missing folder/list/image, and DataError naming the mask for
    a mask with values outside 0..C-1/255.
    """
    out = Path(out_dir)
    kind = ds["kind"]
    root = Path(ds["root"]).expanduser().resolve()
    if kind == "voc":
        problems = voc_layout_problems(ds)
        if problems:
            raise DatasetError("VOC dataset is not usable:\n  - " + "\n  - ".join(problems) + "\n" + VOC_HOWTO)
        classes = list(VOC_CLASSES)
        mask_dir = root / ds.get("mask_dir", "SegmentationClassAug")
        lists = {s: _resolve(root, p) for s, p in ds["lists"].items()}
    elif kind == "toy":
        classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
        mask_dir = root / "SegmentationClass"
        lists = {s: root / "ImageSets" / "Segmentation" / f"{s}.txt" for s in ("train_aug", "train", "val")}
        for p in [mask_dir, *lists.values()]:
            if not p.exists():
                raise DatasetError(f"toy dataset is incomplete: {p} is missing; rerun the make_toy_dataset rule")
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}")
    image_dir = root / "JPEGImages"
    n_classes = len(classes)
    split_ids = {s: sorted(read_id_list(p)) for s, p in lists.items()}
    all_ids = sorted(set().union(*split_ids.values()))

    missing = [i for i in all_ids if not (image_dir / f"{i}.jpg").is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed images are missing from {image_dir}, e.g. "
                           f"{[str(image_dir / (i + '.jpg')) for i in missing[:3]]}")

    labels: dict[str, list[int]] = {}
    source = {}
    if ds.get("cls_labels"):
        table = np.load(Path(ds["cls_labels"]).expanduser(), allow_pickle=True).item()
        for i in all_ids:
            if i in table:
                labels[i] = [int(k) + 1 for k in np.flatnonzero(np.asarray(table[i]) > 0.5)]
                source[i] = "cls_labels"
    todo = [(i, str(mask_dir / f"{i}.png"), n_classes) for i in all_ids if i not in labels]
    errors = []
    if todo:
        if n_workers > 1 and len(todo) > 256:
            with ProcessPoolExecutor(n_workers) as pool:
                results = list(pool.map(_labels_from_mask, todo, chunksize=64))
        else:
            results = [_labels_from_mask(t) for t in todo]
        for image_id, labs, err in results:
            if err:
                errors.append(err)
            elif labs is not None:
                labels[image_id] = labs
                source[image_id] = "mask"
    if errors:
        raise DatasetError(f"{len(errors)} masks are invalid:\n  " + "\n  ".join(errors[:5]))
    ann_dir = root / ds.get("annotations_dir", "Annotations")
    for i in all_ids:
        if i not in labels and (ann_dir / f"{i}.xml").is_file():
            labels[i] = _labels_from_xml(ann_dir / f"{i}.xml", classes)
            source[i] = "xml"
    train_like = set(split_ids.get("train_aug", [])) | set(split_ids.get("train", []))
    unlabeled = [i for i in all_ids if i not in labels and i in train_like]
    if unlabeled:
        raise DatasetError(f"{len(unlabeled)} training images have no image-level label (no mask in {mask_dir}, "
                           f"no XML in {ann_dir}, not in cls_labels), e.g. {unlabeled[:3]}")

    list_paths = {}
    for s, ids in split_ids.items():
        list_paths[s] = out / "lists" / f"{s}.txt"
        write_text(list_paths[s], "".join(f"{i}\n" for i in ids))
    write_json(out / "labels.json", {"classes": classes, "labels": {i: labels[i] for i in sorted(labels)}})
    per_class = np.zeros(n_classes, dtype=np.int64)
    for i in split_ids.get("train_aug", all_ids):
        for c in labels.get(i, []):
            per_class[c] += 1
    manifest = {
        "name": dataset_name,
        "kind": kind,
        "root": str(root),
        "image_dir": str(image_dir),
        "mask_dir": str(mask_dir),
        "classes": classes,
        "n_classes": n_classes,
        "splits": {s: len(v) for s, v in split_ids.items()},
        "images_per_class_train_aug": {c: int(n) for c, n in zip(classes, per_class)},
        "label_source": {k: sum(1 for v in source.values() if v == k) for k in ("cls_labels", "mask", "xml")},
        "sha256": {**{f"lists/{s}.txt": _sha256(p) for s, p in list_paths.items()},
                   "labels.json": _sha256(out / "labels.json")},
        "synthetic": kind == "toy",
    }
    write_json(out / "manifest.json", manifest)
    return manifest


class DatasetInfo:
    """Read-side view of a prepared dataset folder (``manifest.json``, ``labels.json``, ``lists/``)."""

    def __init__(self, prepared_dir: str | os.PathLike):
        self.dir = Path(prepared_dir)
        self.manifest = read_json(self.dir / "manifest.json")
        lab = read_json(self.dir / "labels.json")
        self.classes: list[str] = lab["classes"]
        self._labels: dict[str, list[int]] = lab["labels"]
        self.image_dir = Path(self.manifest["image_dir"])
        self.mask_dir = Path(self.manifest["mask_dir"])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def ids(self, split: str) -> list[str]:
        p = self.dir / "lists" / f"{split}.txt"
        if not p.is_file():
            raise DatasetError(f"split {split!r} is not prepared (no {p})")
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]

    def labels(self, image_id: str) -> list[int]:
        """Image-level labels (class values 1..C-1) of an image."""
        return self._labels[image_id]

    def multi_hot(self, ids: Iterable[str]) -> np.ndarray:
        """(N, C-1) float32 multi-hot over foreground classes."""
        ids = list(ids)
        out = np.zeros((len(ids), self.n_classes - 1), dtype=np.float32)
        for r, i in enumerate(ids):
            for c in self._labels[i]:
                out[r, c - 1] = 1.0
        return out

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"
