"""Dataset preparation: layout checks, id lists, image-level labels and the manifest every later stage reads.

Outputs of :func:`prepare_dataset` (in ``out_dir``):

- ``lists/<split>.txt``: sorted ids per split (train_aug, train, val, ...);
- ``labels.json``: ``{"classes": [bg, ...], "labels": {id: [class labels 1..C-1]}}`` (image-level labels);
- ``manifest.json``: kind, root (as configured) and image/mask folders relative to it, class names, counts per split, images per class,
  sha256 of the lists and labels, where the labels came from.

Masks are only for evaluation; training stages read ``labels.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DatasetError, first_few
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


def _relative(p: Path, root: Path) -> str:
    """``p`` relative to ``root`` when it lies inside it, else as it is."""
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def voc_lists(ds: Mapping[str, Any], name: str = "<name>") -> tuple[dict[str, Path], list[str]]:
    """The id lists to prepare (split -> path) and the problems with them. A list that a split role uses
    (``datasets.<name>.splits``) must exist; any other (e.g. ``test`` when ``splits.test`` is null) is prepared
    only when present."""
    root = Path(ds["root"]).expanduser()
    used = {v for v in (ds.get("splits") or {}).values() if v}
    lists, problems = {}, []
    for split, rel in ds["lists"].items():
        p = _resolve(root, rel)
        if p.is_file():
            lists[split] = p
        elif split in used or not ds.get("splits"):
            roles = sorted(r for r, v in (ds.get("splits") or {}).items() if v == split)
            skip = (f" (or set datasets.{name}.splits.test: null to do without the test split)" if roles == ["test"]
                    else "")
            problems.append(f"missing id list for split {split!r} (datasets.{name}.lists.{split}): {p.resolve()}"
                            + skip)
    return lists, problems


def voc_layout_problems(ds: Mapping[str, Any], name: str = "<name>") -> list[str]:
    """Cheap checks (no per-file work) of a VOC-style tree; each problem names the path. Used at DAG build time."""
    root = Path(ds["root"]).expanduser()
    if not root.is_dir():
        return [f"dataset root {root.resolve()} does not exist (datasets.{name}.root)"]
    problems = []
    for key, sub in (("root", "JPEGImages"), ("mask_dir", ds.get("mask_dir", "SegmentationClassAug"))):
        if not (root / sub).is_dir():
            problems.append(f"missing folder {(root / sub).resolve()}"
                            + (f" (datasets.{name}.mask_dir)" if key == "mask_dir" else ""))
    problems += voc_lists(ds, name)[1]
    if ds.get("cls_labels") and not Path(ds["cls_labels"]).expanduser().is_file():
        problems.append(f"missing cls_labels file {Path(ds['cls_labels']).expanduser().resolve()} "
                        f"(datasets.{name}.cls_labels; set it to null to derive the labels from the masks)")
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


def _check_item(args: tuple[str, str, str, int]) -> tuple[str, str | None, list[int] | None, str | None]:
    """(id, image problem, class values of its mask (None: no mask), mask problem) of one listed image.

    The image is decoded (JPEG at 1/8 scale: the whole entropy-coded stream is still read, so a truncated or
    garbled file fails here, in prepare_dataset, and not hours later in a training job)."""
    from PIL import Image

    image_id, image_path, mask_path, n_classes = args
    image_err = None
    try:
        with Image.open(image_path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as exc:  # PIL raises several types for truncated/corrupt files
        image_err = f"{image_id}: {image_path} ({type(exc).__name__}: {exc})"
    if not os.path.isfile(mask_path):
        return image_id, image_err, None, None
    try:
        mask = read_label_png(mask_path, n_classes)
    except Exception as exc:  # reported together below
        return image_id, image_err, None, str(exc)
    vals = np.unique(mask)
    return image_id, image_err, [int(v) for v in vals if 0 < v < n_classes and v != IGNORE_INDEX], None


def _labels_from_xml(path: Path, classes: Sequence[str]) -> list[int]:
    names = {obj.findtext("name", "").strip() for obj in ET.parse(path).getroot().iter("object")}
    return sorted(classes.index(n) for n in names if n in classes)


# How far a cls_labels file may disagree with the masks before it is an error (fractions of the images that have
# both). Measured on the standard VOC12 cls_labels.npy (IRN/PSA, from the XML annotations) against
# SegmentationClassAug: 1 of 12,031 images lacks a class its mask shows, 817 (6.8 %) name a class their mask does
# not show (objects that the SBD masks leave out) -- both tolerated, with a warning. A file for another dataset, id
# set or class order disagrees on most images.
CLS_LABELS_MAX_LACKING = 0.01
CLS_LABELS_MAX_EXTRA = 0.20


def _cls_labels_fix(classes: Sequence[str], name: str) -> str:
    return (f"Fix: regenerate cls_labels.npy for this dataset (a dict id -> {len(classes) - 1}-d multi-hot over "
            f"{classes[1]}..{classes[-1]}, background excluded, saved with np.save), or drop "
            f"datasets.{name}.cls_labels (set it to null) to derive the labels from the masks.")


def read_cls_labels(path: str | os.PathLike, classes: Sequence[str], name: str = "<name>") -> dict[str, list[int]]:
    """Image-level labels (class values 1..C-1) of a ``cls_labels.npy`` (dict id -> (C-1)-d multi-hot);
    raises DatasetError naming the file, the problem and the fix when it is unreadable or of the wrong shape."""
    fix = _cls_labels_fix(classes, name)
    try:
        obj = np.load(path, allow_pickle=True)
        table = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except Exception as exc:
        raise DatasetError(f"cannot read cls_labels file {path} (datasets.{name}.cls_labels): "
                           f"{type(exc).__name__}: {exc}. {fix}") from exc
    if not isinstance(table, dict):
        raise DatasetError(f"cls_labels file {path} (datasets.{name}.cls_labels) holds a {type(table).__name__}, "
                           f"not a dict id -> multi-hot. {fix}")
    n_fg = len(classes) - 1
    bad = [f"{k}: shape {np.shape(v)}" for k, v in table.items() if np.shape(v) != (n_fg,)]
    if bad:
        raise DatasetError(f"cls_labels file {path} (datasets.{name}.cls_labels): {len(bad)} of {len(table)} "
                           f"entries are not {n_fg}-d multi-hot vectors ({first_few(bad, 3)}). {fix}")
    return {str(k): [int(c) + 1 for c in np.flatnonzero(np.asarray(v) > 0.5)] for k, v in table.items()}


def check_cls_labels(table: Mapping[str, list[int]], mask_labels: Mapping[str, list[int]], classes: Sequence[str],
                     path: str | os.PathLike, mask_dir: str | os.PathLike, name: str = "<name>") -> dict[str, Any]:
    """Compare cls_labels with the classes the masks show (images with both). Raises DatasetError (counts, first
    ids, fix) beyond the tolerances above; logs a warning listing the first ids below them. Returns the counts."""
    common = sorted(set(table) & set(mask_labels))
    lacking = [i for i in common if set(mask_labels[i]) - set(table[i])]
    extra = [i for i in common if set(table[i]) - set(mask_labels[i])]

    def show(ids):
        names = lambda labs: "[" + ", ".join(classes[c] for c in sorted(labs)) + "]"  # noqa: E731
        return first_few([f"{i} (cls_labels {names(table[i])}, mask {names(mask_labels[i])})" for i in ids], 3)

    parts = []
    if lacking:
        parts.append(f"{len(lacking)} lack a class their mask shows: {show(lacking)}")
    if extra:
        parts.append(f"{len(extra)} name a class their mask does not show: {show(extra)}")
    what = (f"cls_labels file {path} (datasets.{name}.cls_labels) disagrees with the masks in {mask_dir}: of "
            f"{len(common)} images with both, " + "; ".join(parts) + ".")
    n = max(len(common), 1)
    if len(lacking) > CLS_LABELS_MAX_LACKING * n or len(extra) > CLS_LABELS_MAX_EXTRA * n:
        raise DatasetError(f"{what} That is more than the {CLS_LABELS_MAX_LACKING:.0%} / "
                           f"{CLS_LABELS_MAX_EXTRA:.0%} tolerated: is the file for another dataset, id set or class "
                           f"order? {_cls_labels_fix(classes, name)}")
    if parts:
        logging.getLogger("wsss").warning("%s Tolerated (XML-derived labels name objects the masks leave out); "
                                          "the labels of these images come from the cls_labels file.", what)
    return {"compared": len(common), "lacking_mask_class": len(lacking), "extra_class": len(extra),
            "lacking_examples": lacking[:10], "extra_examples": extra[:10]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_dataset(ds: Mapping[str, Any], dataset_name: str, out_dir: str | os.PathLike, n_workers: int = 1,
                    coco_markers: Sequence[str] | None = None) -> dict:
    """Write lists, labels and manifest for dataset config ``ds`` (kind toy, voc or coco); returns the manifest.

    COCO (``kind: coco``): the lists, labels and class names come from the ``coco_masks`` shard markers
    ``coco_markers`` (:func:`wsss_core.stages.dataset.coco_masks`), the masks from the folder they were written
    to; the images of both split folders are linked into ``images/`` of ``out_dir`` (one folder of ``<id>.jpg``, as
    every stage reads them), and the manifest gives both folders relative to ``out_dir``.

    Checks everything before writing anything, and raises DatasetError naming the paths (first few), the counts and
    the fix for: a missing folder or id list; listed ids without an image; images that do not decode (each listed
    image is decoded, JPEGs at 1/8 scale); masks with values outside 0..C-1/255; a ``cls_labels`` file that is
    unreadable, of the wrong shape, or disagrees with the masks beyond :data:`CLS_LABELS_MAX_LACKING` /
    :data:`CLS_LABELS_MAX_EXTRA` (below them: a warning on the ``wsss`` logger, counts in the manifest under
    ``cls_labels_check``); training images without any label.
    """
    out = Path(out_dir)
    kind = ds["kind"]
    root = Path(ds["root"]).expanduser().resolve()
    if kind == "voc":
        problems = voc_layout_problems(ds, dataset_name)
        if problems:
            raise DatasetError(f"dataset {dataset_name!r} (datasets.{dataset_name}.root = {ds['root']}) is not "
                               "usable:\n  - " + "\n  - ".join(problems) + "\n" + VOC_HOWTO)
        classes = list(VOC_CLASSES)
        mask_dir = root / ds.get("mask_dir", "SegmentationClassAug")
        lists = voc_lists(ds, dataset_name)[0]
    elif kind == "coco":
        classes, mask_dir, coco_ids, coco_labels = _coco_from_markers(coco_markers or [])
        image_dir = _link_coco_images(ds, root, coco_ids, out)
    elif kind == "toy":
        classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
        mask_dir = root / "SegmentationClass"
        lists = {s: root / "ImageSets" / "Segmentation" / f"{s}.txt" for s in ("train_aug", "train", "val")}
        for p in [mask_dir, *lists.values()]:
            if not p.exists():
                raise DatasetError(f"toy dataset is incomplete: {p} is missing; rerun the make_toy_dataset rule")
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}")
    if kind != "coco":
        image_dir = root / "JPEGImages"
        split_ids = {s: sorted(read_id_list(p)) for s, p in lists.items()}
    else:
        split_ids = coco_ids
        lists = {s: Path(f"<coco_masks {s}>") for s in split_ids}
    n_classes = len(classes)
    all_ids = sorted(set().union(*split_ids.values()))

    def listed_in(ids) -> str:
        ids = set(ids)
        return ", ".join(str(p) for s, p in lists.items() if ids & set(split_ids[s]))

    missing = [i for i in all_ids if not (image_dir / f"{i}.jpg").is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(all_ids)} listed images are missing from {image_dir}: "
            f"{first_few(f'{i} ({image_dir / i}.jpg)' for i in missing)}. They are listed in "
            f"{listed_in(missing)}. Fix: put the images there as <id>.jpg (an incomplete download or extraction?) "
            f"or remove these ids from those lists.")

    todo = [(i, str(image_dir / f"{i}.jpg"), str(mask_dir / f"{i}.png"), n_classes) for i in all_ids]
    if n_workers > 1 and len(todo) > 256:
        with ProcessPoolExecutor(n_workers) as pool:
            results = list(pool.map(_check_item, todo, chunksize=64))
    else:
        results = [_check_item(t) for t in todo]
    bad_images = [(i, err) for i, err, _, _ in results if err]
    if bad_images:
        raise DatasetError(
            f"{len(bad_images)} of {len(all_ids)} listed images are corrupt or unreadable:\n  - "
            + "\n  - ".join(err for _, err in bad_images[:5])
            + (f"\n  - ... ({len(bad_images) - 5} more)" if len(bad_images) > 5 else "")
            + f"\nFix: replace these files with valid JPEGs (download or extract the dataset again) or remove their "
            f"ids from {listed_in(i for i, _ in bad_images)}.")
    bad_masks = [(i, err) for i, _, _, err in results if err]
    if bad_masks:
        fix = (f"point datasets.{dataset_name}.mask_dir at single-channel index PNGs with values 0 (background), "
               f"1..{n_classes - 1} ({classes[1]}..{classes[-1]}) and 255 (void)" if kind == "voc" else
               f"regenerate the toy dataset (delete {root} and rerun the make_toy_dataset rule)")
        raise DatasetError(
            f"{len(bad_masks)} of {len(all_ids)} masks in {mask_dir} are invalid:\n  - "
            + "\n  - ".join(err for _, err in bad_masks[:5])
            + (f"\n  - ... ({len(bad_masks) - 5} more)" if len(bad_masks) > 5 else "")
            + f"\nFix: {fix}, or remove these ids from {listed_in(i for i, _ in bad_masks)}.")
    mask_labels = {i: labs for i, _, labs, _ in results if labs is not None}

    labels: dict[str, list[int]] = {}
    source = {}
    cls_check = None
    if kind == "coco":  # image-level labels from the instance annotations (crowd regions included)
        labels.update(coco_labels)
        source.update({i: "annotations" for i in coco_labels})
    elif ds.get("cls_labels"):
        cls_path = Path(ds["cls_labels"]).expanduser().resolve()
        table = read_cls_labels(cls_path, classes, dataset_name)
        cls_check = check_cls_labels(table, mask_labels, classes, cls_path, mask_dir, dataset_name)
        for i in all_ids:
            if i in table:
                labels[i] = table[i]
                source[i] = "cls_labels"
    for i, labs in mask_labels.items():
        if i not in labels:
            labels[i] = labs
            source[i] = "mask"
    ann_dir = root / ds.get("annotations_dir", "Annotations")
    for i in all_ids:
        if i not in labels and (ann_dir / f"{i}.xml").is_file():
            labels[i] = _labels_from_xml(ann_dir / f"{i}.xml", classes)
            source[i] = "xml"
    train_like = set(split_ids.get("train_aug", [])) | set(split_ids.get("train", []))
    unlabeled = [i for i in all_ids if i not in labels and i in train_like]
    if unlabeled:
        raise DatasetError(
            f"{len(unlabeled)} training images have no image-level label (no mask in {mask_dir}, no XML in "
            f"{ann_dir}, not in cls_labels): {first_few(unlabeled)}. Fix: add their masks or annotations, give "
            f"datasets.{dataset_name}.cls_labels a file that covers them, or remove them from "
            f"{listed_in(unlabeled)}.")

    list_paths = {}
    for s, ids in split_ids.items():
        list_paths[s] = out / "lists" / f"{s}.txt"
        write_text(list_paths[s], "".join(f"{i}\n" for i in ids))
    write_json(out / "labels.json", {"classes": classes, "labels": {i: labels[i] for i in sorted(labels)}})
    per_class = np.zeros(n_classes, dtype=np.int64)
    for i in split_ids.get("train_aug", split_ids.get("train", all_ids)):
        for c in labels.get(i, []):
            per_class[c] += 1
    manifest = {
        "name": dataset_name,
        "kind": kind,
        # as configured (relative: to the run folder) and relative to it: a moved run (with its dataset) still reads
        "root": str(ds["root"]),
        "image_dir": os.path.relpath(image_dir, out) if kind == "coco" else _relative(image_dir, root),
        "mask_dir": os.path.relpath(mask_dir, out.resolve()) if kind == "coco" else _relative(mask_dir, root),
        "dirs_relative_to": "prepared" if kind == "coco" else "root",
        "classes": classes,
        "n_classes": n_classes,
        "splits": {s: len(v) for s, v in split_ids.items()},
        "images_per_class_train_aug": {c: int(n) for c, n in zip(classes, per_class)},
        "label_source": {k: sum(1 for v in source.values() if v == k)
                         for k in ("cls_labels", "mask", "xml", "annotations")},
        "sha256": {**{f"lists/{s}.txt": _sha256(p) for s, p in list_paths.items()},
                   "labels.json": _sha256(out / "labels.json")},
        "synthetic": kind == "toy",
    }
    if cls_check is not None:
        manifest["cls_labels_check"] = cls_check
    write_json(out / "manifest.json", manifest)
    return manifest


def _coco_from_markers(markers: Sequence[str]) -> tuple[list[str], Path, dict[str, list[str]], dict]:
    """(classes, mask folder, split -> sorted ids, id -> labels) from the ``coco_masks`` shard markers; markers that
    disagree (classes, mask folder) or miss shards are a DatasetError naming them."""
    if not markers:
        raise DatasetError("a COCO dataset is prepared from its coco_masks markers, and none were given")
    classes, mask_dir, ids, labels, shards = None, None, {}, {}, {}
    for path in markers:
        m = read_json(path)
        folder = (Path(path).parent.parent / "masks").resolve()
        if classes is None:
            classes, mask_dir = list(m["classes"]), folder
        elif list(m["classes"]) != classes or folder != mask_dir:
            raise DatasetError(f"coco_masks marker {path} disagrees with {markers[0]} on the classes or the mask "
                               "folder; delete the coco_masks folder of this dataset and rerun")
        ids.setdefault(m["split"], []).extend(m["ids"])
        labels.update(m["labels"])
        shards.setdefault(m["split"], set()).add((int(m["shard"]), int(m["n_shards"])))
    for split, got in shards.items():
        n = {k for _, k in got}
        if len(n) != 1 or {s for s, _ in got} != set(range(n.pop())):
            raise DatasetError(f"coco_masks markers of split {split!r} are incomplete or mixed: {sorted(got)}")
    return classes, mask_dir, {s: sorted(v) for s, v in ids.items()}, labels


def _link_coco_images(ds: Mapping[str, Any], root: Path, split_ids: Mapping[str, list[str]], out: Path) -> Path:
    """``out/images/<id>.jpg`` -> the image in its split folder (``ds['image_dirs'][split]`` under ``root``); a
    missing image is a DatasetError naming the first few and where COCO comes from."""
    from .coco import COCO_HOWTO, COCO_LAYOUT

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    missing = []
    dirs = dict(ds.get("image_dirs") or {s: folder for s, (folder, _) in COCO_LAYOUT.items()})
    for split, ids in split_ids.items():
        src_dir = _resolve(root, dirs.get(split, f"{split}2014"))
        for i in ids:
            src, link = src_dir / f"{i}.jpg", folder / f"{i}.jpg"
            if not src.is_file():
                missing.append(str(src))
                continue
            if link.is_symlink() or link.exists():
                if os.path.realpath(link) == str(src.resolve()):
                    continue
                link.unlink()
            os.symlink(src.resolve(), link)
    if missing:
        raise DatasetError(f"{len(missing)} COCO images with annotations are missing: {first_few(missing)}. "
                           + COCO_HOWTO)
    return folder


class DatasetInfo:
    """Read-side view of a prepared dataset folder (``manifest.json``, ``labels.json``, ``lists/``)."""

    def __init__(self, prepared_dir: str | os.PathLike):
        self.dir = Path(prepared_dir)
        self.manifest = read_json(self.dir / "manifest.json")
        lab = read_json(self.dir / "labels.json")
        self.classes: list[str] = lab["classes"]
        self._labels: dict[str, list[int]] = lab["labels"]
        # relative: to the run folder (the job's working directory); manifests of older runs hold absolute folders
        root = Path(self.manifest.get("root", ".")).expanduser()
        if self.manifest.get("dirs_relative_to") == "prepared":  # COCO: linked images, generated masks
            root = self.dir
        self.image_dir = root / self.manifest["image_dir"]
        self.mask_dir = root / self.manifest["mask_dir"]

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
