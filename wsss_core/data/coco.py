"""MS COCO 2014 as a semantic-segmentation dataset: class list, instance-file index, class masks, tree check, toy COCO.

Conventions (``specs/crf_and_eval.md``, "MS COCO 2014"; SIPE ``data/labels_coco.txt``):

- 81 classes: background = 0, then the 80 COCO categories re-indexed contiguously 1..80 in category-id order
  (person = 1, bicycle = 2, car = 3, ..., toothbrush = 80), named as in ``labels_coco.txt`` (spaces written as
  ``_``: ``traffic_light``; the instances files write ``traffic light``). :data:`COCO_CLASSES`.
- Id lists = images with at least one annotation (crowd annotations count): 82,081 train / 40,137 val stems such as
  ``COCO_train2014_000000000009`` (the file name without ``.jpg``).
- Class masks are made from the instance annotations by :func:`class_mask`. The references' masks are an external
  download whose conversion script is not published, so the convention is ours and documented there: background 0,
  crowd regions 255 (ignore) painted first, then the non-crowd instances in file order, a later one on top.

The instances files follow the COCO "object detection" format (https://cocodataset.org/#format-data): ``images``
(``id``, ``file_name``, ``height``, ``width``), ``annotations`` (``id``, ``image_id``, ``category_id``, ``iscrowd``,
``area``, ``bbox`` = [x, y, w, h], ``segmentation``) and ``categories`` (``id``, ``name``). A segmentation is a list
of polygons (flat ``[x1, y1, x2, y2, ...]`` in pixel-corner coordinates: pixel (r, c) covers [c, c+1) x [r, r+1)),
an uncompressed RLE ``{"counts": [int, ...], "size": [h, w]}`` (crowds) or a compressed RLE (``counts`` a string).
RLE runs are column-major (Fortran order), starting with a run of zeros. Decoding uses pycocotools' mask API
(``pycocotools/mask.py`` and ``COCO.annToRLE`` in ``pycocotools/coco.py`` of github.com/cocodataset/cocoapi,
PythonAPI).

Layout of a COCO tree (:data:`COCO_HOWTO`, :func:`coco_tree_problems`)::

    <root>/train2014/COCO_train2014_<12 digits>.jpg
    <root>/val2014/COCO_val2014_<12 digits>.jpg
    <root>/annotations/instances_train2014.json
    <root>/annotations/instances_val2014.json

:func:`write_toy_coco` turns the project's toy VOC-format dataset (:mod:`wsss_core.data.toy`) into such a tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import warnings
from array import array
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DatasetError, first_few
from ..store.atomic import write_json, write_text
from .io import IGNORE_INDEX, write_image

__all__ = ["COCO_CLASSES", "COCO_HOWTO", "CocoIndex", "category_map", "classes_from_categories", "class_mask",
           "coco_tree_problems", "write_toy_coco"]

#: Class names; the index is the label value in the masks. 0 is background, then the 80 COCO categories in
#: category-id order, spelled as in SIPE's ``labels_coco.txt`` (``_`` for the instances files' spaces).
COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic_light", "fire_hydrant", "stop_sign", "parking_meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports_ball", "kite", "baseball_bat", "baseball_glove", "skateboard", "surfboard",
    "tennis_racket", "bottle", "wine_glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot_dog", "pizza", "donut", "cake", "chair", "couch", "potted_plant", "bed",
    "dining_table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell_phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy_bear", "hair_drier", "toothbrush",
)

#: COCO 2014's 80 category ids (1..90 without the 10 unused ones), in order: category COCO_2014_IDS[k] is class k + 1
COCO_2014_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

COCO_HOWTO = ("MS COCO 2014: download train2014.zip, val2014.zip and annotations_trainval2014.zip from cocodataset.org "
              "(http://images.cocodataset.org/zips/train2014.zip, http://images.cocodataset.org/zips/val2014.zip, "
              "http://images.cocodataset.org/annotations/annotations_trainval2014.zip) and unzip all three into one "
              "folder <root>, so that <root>/train2014/*.jpg, <root>/val2014/*.jpg and "
              "<root>/annotations/instances_train2014.json, <root>/annotations/instances_val2014.json exist.")

#: COCO split folder -> instances file name (under ``<root>/annotations``)
#: COCO 2014's layout under its root: split -> (image folder, instances file); ``datasets.<D>.image_dirs`` /
#: ``annotations`` override it per split
COCO_LAYOUT: dict[str, tuple[str, str]] = {"train": ("train2014", "annotations/instances_train2014.json"),
                                           "val": ("val2014", "annotations/instances_val2014.json")}
_SPLITS = {folder: Path(ann).name for folder, ann in COCO_LAYOUT.values()}

_CROWD_MODES = ("ignore", "class")
_OVERLAP_MODES = ("later", "smaller")


# --------------------------------------------------------------------------------------------- categories

def _name(name: str) -> str:
    """A category name in the class-list spelling: spaces as ``_`` (``traffic light`` -> ``traffic_light``)."""
    return str(name).strip().replace(" ", "_")


def _pairs(categories: Iterable) -> list[tuple[int, str]]:
    """(id, name) pairs sorted by id, from (id, name) pairs or ``{"id", "name"}`` dicts; duplicate ids are an error."""
    out = []
    for c in categories:
        cid, name = (c["id"], c["name"]) if isinstance(c, Mapping) else c
        out.append((int(cid), str(name)))
    out.sort(key=lambda p: p[0])
    dup = sorted({a for (a, _), (b, _) in zip(out, out[1:]) if a == b})
    if dup:
        raise DatasetError(f"COCO categories: duplicate category ids {first_few(dup)}")
    return out


def category_map(categories: Iterable, expected: Sequence[str] | None = COCO_CLASSES) -> dict[int, int]:
    """Category id -> contiguous class value 1..K, in category-id order (COCO 2014: person 1 -> 1, ..., 90 -> 80).

    ``categories``: (id, name) pairs (:attr:`CocoIndex.categories`) or the file's ``{"id", "name", ...}`` dicts.
    ``expected``: the class list the map must reproduce (background first): the category names in id order must
    equal ``expected[1:]`` (a space and ``_`` count as equal), else a DatasetError listing the first mismatches.
    ``None`` accepts any names (another dataset, e.g. :func:`write_toy_coco`'s); :func:`classes_from_categories`
    then gives the class list.
    """
    cats = _pairs(categories)
    if not cats:
        raise DatasetError("COCO categories: the list is empty (an instances file has a 'categories' list)")
    if len(cats) > IGNORE_INDEX - 1:
        raise DatasetError(f"COCO categories: {len(cats)} categories do not fit uint8 masks (at most "
                           f"{IGNORE_INDEX - 1}, 255 is ignore)")
    if expected is not None:
        want = [_name(n) for n in list(expected)[1:]]
        have = [_name(n) for _, n in cats]
        if have != want:
            bad = [f"{len(have)} categories in the file, {len(want)} expected"] if len(have) != len(want) else []
            bad += [f"class {k + 1}: category {cats[k][0]} {cats[k][1]!r} != expected {want[k]!r}"
                    for k in range(min(len(have), len(want))) if have[k] != want[k]]
            raise DatasetError(f"COCO categories (in id order) do not match the expected {len(want)}-class list: "
                               f"{first_few(bad, 4)}. Is this the MS COCO 2014 instances file? For another "
                               "category set, pass expected=None (and use classes_from_categories).")
    return {cid: k + 1 for k, (cid, _) in enumerate(cats)}


def classes_from_categories(categories: Iterable) -> list[str]:
    """``["background", *category names in id order]`` (spaces written as ``_``, as in :data:`COCO_CLASSES`): the
    class list that goes with ``category_map(categories, expected=None)``."""
    return ["background", *(_name(n) for _, n in _pairs(categories))]


# --------------------------------------------------------------------------------------------- the index

class _Bad(Exception):
    """A malformed entry met while parsing (turned into a DatasetError naming the file)."""


_TAKEN = object()  # what an annotation becomes in the parsed document: its fields went into the columns


class _Columns:
    """``json.load`` object hook that moves each annotation into compact columns the moment it is parsed.

    Annotation fields go into ``array.array`` columns (ids, image ids, category ids, crowd flags, areas, boxes);
    polygon coordinates are appended to one float64 buffer (``coords``, exactly the JSON numbers) with the end of
    each polygon in ``poly_end``; an RLE (crowds: uncompressed counts, stored as uint32 arrays; compressed strings as
    they are) goes into the list ``rles``. The annotation itself becomes a shared marker, so the Python lists of
    polygon numbers (about 32 bytes per number) are freed one annotation at a time. Images become small tuples.
    """

    def __init__(self):
        self.ann_id, self.image_id, self.cat = array("q"), array("q"), array("q")
        self.crowd, self.area, self.bbox = array("b"), array("d"), array("d")
        self.seg_ref, self.seg_n = array("q"), array("q")  # polygons: first polygon, count; RLE: -1 - rle index, 0
        self.coords, self.poly_end = array("d"), array("q")
        self.rles: list[dict] = []

    def __call__(self, d: dict) -> Any:
        if "segmentation" in d:
            self._annotation(d)
            return _TAKEN
        if "file_name" in d:
            try:
                return int(d["id"]), str(d["file_name"]), int(d["height"]), int(d["width"])
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise _Bad(f"image {d.get('id')!r} ({d.get('file_name')!r}): missing or invalid field "
                           f"({type(exc).__name__}: {exc})") from None
        return d

    def _annotation(self, d: dict) -> None:
        ann_id = d.get("id")
        try:
            fields = (int(d["id"]), int(d["image_id"]), int(d["category_id"]), int(d.get("iscrowd", 0)),
                      float(d.get("area", 0.0)))
            bbox = d.get("bbox")
            box = [float(v) for v in bbox] if bbox is not None else [np.nan] * 4
            if len(box) != 4:
                raise ValueError(f"bbox has {len(box)} numbers")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise _Bad(f"annotation {ann_id!r}: missing or invalid field ({type(exc).__name__}: {exc})") from None
        seg = d["segmentation"]
        if isinstance(seg, list):
            first = len(self.poly_end)
            try:
                for p in seg:
                    if not isinstance(p, list):
                        raise TypeError(f"a polygon is a {type(p).__name__}")
                    self.coords.extend(p)
                    self.poly_end.append(len(self.coords))
            except (TypeError, ValueError, OverflowError) as exc:
                raise _Bad(f"annotation {ann_id}: polygon segmentation is not a list of number lists "
                           f"({exc})") from None
            ref, n = first, len(seg)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            counts = seg["counts"]
            if not isinstance(counts, (str, bytes)):
                try:
                    arr = np.asarray(counts, dtype=np.int64).reshape(-1)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise _Bad(f"annotation {ann_id}: RLE counts are not integers ({exc})") from None
                if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 32):
                    raise _Bad(f"annotation {ann_id}: RLE counts outside 0..2**32-1")
                seg = {"counts": arr.astype(np.uint32), "size": seg["size"]}
            else:
                seg = {"counts": counts, "size": seg["size"]}
            ref, n = -1 - len(self.rles), 0
            self.rles.append(seg)
        else:
            raise _Bad(f"annotation {ann_id}: segmentation is neither a polygon list nor an RLE dict with counts "
                       "and size")
        for col, v in zip((self.ann_id, self.image_id, self.cat, self.crowd, self.area), fields):
            col.append(v)
        self.bbox.extend(box)
        self.seg_ref.append(ref)
        self.seg_n.append(n)


def _stem(file_name: str) -> str:
    return posixpath.splitext(posixpath.basename(file_name.replace("\\", "/")))[0]


def _column(a: array, dtype) -> np.ndarray:
    """A read-only numpy view of an ``array.array`` column (no copy)."""
    out = np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype=dtype)
    out.flags.writeable = False
    return out


class CocoIndex:
    """A parsed COCO instances file, indexed by image stem (file name without extension).

    Memory: the file is parsed by ``json.load`` with an object hook (:class:`_Columns`) that moves each annotation
    into compact columns as soon as it is parsed: numbers into ``array.array`` columns, all polygon coordinates into
    one float64 buffer, RLEs (crowds) into a list; so the per-number Python floats of the raw JSON (about 32 bytes
    each, most of a parsed COCO file) are freed annotation by annotation and no per-annotation Python object is kept.
    The index then holds numpy views of those columns, ordered by image (a stable argsort: file order within an
    image), the image table (ids, file names, sizes), and nothing else of the document. The peak is the file's text
    (``json.load`` reads it whole) plus the columns (about 8 bytes per coordinate); ``pycocotools.coco.COCO`` keeps
    the whole parsed document (Python floats and dicts) plus its indexes. On a 65 MB synthetic file (140k
    annotations): peak RSS growth 139 MB vs COCO's 460 MB, held after loading 83 MB vs 406 MB (bench item 9 records
    the figures of its own file).

    Attributes:
        path: the instances file.
        categories: list of (category id, name) sorted by id.
        n_images: number of images in the file, with or without annotations.
    """

    def __init__(self, path: Path, categories: list[tuple[int, str]], images: list[tuple[int, str, int, int]],
                 cols: _Columns):
        self.path = path
        self.categories = categories
        self.n_images = len(images)
        self._file = [f for _, f, _, _ in images]
        self._image_id = np.fromiter((i for i, _, _, _ in images), np.int64, len(images))
        self._hw = np.array([(h, w) for _, _, h, w in images], dtype=np.int64).reshape(-1, 2)
        self._row: dict[str, int] = {}
        for r, f in enumerate(self._file):
            s = _stem(f)
            if s in self._row:
                raise DatasetError(f"{path}: two images have the file-name stem {s!r}")
            self._row[s] = r
        row_of_id = {int(i): r for r, i in enumerate(self._image_id.tolist())}
        if len(row_of_id) != len(images):
            raise DatasetError(f"{path}: duplicate image ids")
        image_ids = _column(cols.image_id, np.int64)
        known_img = np.isin(image_ids, self._image_id)
        if not known_img.all():
            k = int(np.flatnonzero(~known_img)[0])
            raise DatasetError(f"{path}: annotation {cols.ann_id[k]} refers to image id {cols.image_id[k]}, which "
                               "is not in 'images'")
        sorter = np.argsort(self._image_id, kind="stable")
        rows = sorter[np.searchsorted(self._image_id, image_ids, sorter=sorter)] if len(image_ids) else \
            np.zeros(0, np.int64)
        order = np.argsort(rows, kind="stable")  # grouped by image, file order within an image
        self._ann_id = _column(cols.ann_id, np.int64)[order]
        self._cat = _column(cols.cat, np.int64)[order]
        self._crowd = _column(cols.crowd, np.int8)[order]
        self._area = _column(cols.area, np.float64)[order]
        self._bbox = _column(cols.bbox, np.float64).reshape(-1, 4)[order]
        self._seg_ref = _column(cols.seg_ref, np.int64)[order]
        self._seg_n = _column(cols.seg_n, np.int64)[order]
        self._coords = _column(cols.coords, np.float64)  # polygons are not moved: the refs point into it
        self._poly_end = _column(cols.poly_end, np.int64)
        self._rles = cols.rles
        self._start = np.searchsorted(rows[order], np.arange(len(images) + 1))
        known = np.array([c for c, _ in categories], dtype=np.int64)
        unknown = ~np.isin(self._cat, known)
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise DatasetError(f"{path}: annotation {int(self._ann_id[k])} has category id {int(self._cat[k])}, "
                               f"which is not in 'categories' ({first_few(known.tolist())})")
        has = np.diff(self._start) > 0
        self._stems = sorted(_stem(self._file[r]) for r in np.flatnonzero(has).tolist())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CocoIndex":
        """Parse and index an instances file (e.g. ``annotations/instances_val2014.json``).

        A missing, unreadable or invalid file is a DatasetError naming it and saying how to get COCO 2014."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"COCO instances file not found: {path}. {COCO_HOWTO}")
        cols = _Columns()
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh, object_hook=cols)
        except _Bad as exc:
            raise DatasetError(f"invalid COCO instances file {path}: {exc}. {COCO_HOWTO}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(f"unreadable or invalid COCO instances file {path} ({type(exc).__name__}: {exc}). "
                               f"Download it again. {COCO_HOWTO}") from None
        if not isinstance(doc, dict) or any(not isinstance(doc.get(k), list)
                                            for k in ("images", "annotations", "categories")):
            raise DatasetError(f"invalid COCO instances file {path}: a JSON object with the lists 'images', "
                               f"'annotations' and 'categories' is expected. {COCO_HOWTO}")
        images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
        del doc  # info/licenses are not needed
        for what, items, ok in (("images", images, lambda x: isinstance(x, tuple)),
                                ("annotations", anns, lambda x: x is _TAKEN)):
            bad = next((x for x in items if not ok(x)), None)
            if bad is not None:
                raise DatasetError(f"invalid COCO instances file {path}: an entry of '{what}' lacks its fields "
                                   f"({str(bad)[:120]}). {COCO_HOWTO}")
        if len(anns) != len(cols.ann_id):  # an annotation-like dict outside 'annotations'
            raise DatasetError(f"invalid COCO instances file {path}: {len(cols.ann_id)} objects with a "
                               f"'segmentation' but {len(anns)} entries in 'annotations'. {COCO_HOWTO}")
        try:
            categories = _pairs(cats)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"invalid COCO instances file {path}: bad 'categories' entry ({exc})") from None
        except DatasetError as exc:
            raise DatasetError(f"{path}: {exc}") from None
        return cls(path, categories, images, cols)

    # -------------------------------------------------------------------- per image

    def _r(self, stem: str) -> int:
        try:
            return self._row[stem]
        except KeyError:
            raise DatasetError(f"image {stem!r} is not in {self.path}") from None

    def stems(self) -> list[str]:
        """Sorted file-name stems of the images with at least one annotation (crowd annotations count)."""
        return list(self._stems)

    def size(self, stem: str) -> tuple[int, int]:
        """(height, width) of an image, as the file states it."""
        h, w = self._hw[self._r(stem)]
        return int(h), int(w)

    def file_name(self, stem: str) -> str:
        """The image's ``file_name`` (e.g. ``COCO_val2014_000000000042.jpg``)."""
        return self._file[self._r(stem)]

    def annotations(self, stem: str) -> list[dict]:
        """The image's annotations in file order, as dicts with ``id``, ``image_id``, ``category_id``, ``iscrowd``,
        ``area``, ``bbox`` (when the file has one) and ``segmentation`` in the compact form that
        :func:`class_mask` and pycocotools read (polygons: a list of read-only float64 arrays, views of the index's
        coordinate buffer; uncompressed RLE: counts as a uint32 array; compressed RLE: as in the file). Empty for
        an image without annotations."""
        r = self._r(stem)
        image_id = int(self._image_id[r])
        out = []
        for k in range(int(self._start[r]), int(self._start[r + 1])):
            a = {"id": int(self._ann_id[k]), "image_id": image_id, "category_id": int(self._cat[k]),
                 "iscrowd": int(self._crowd[k]), "area": float(self._area[k])}
            if not np.isnan(self._bbox[k, 0]):
                a["bbox"] = self._bbox[k].tolist()
            a["segmentation"] = self._segmentation(k)
            out.append(a)
        return out

    def _segmentation(self, k: int) -> Any:
        ref = int(self._seg_ref[k])
        if ref < 0:
            return self._rles[-1 - ref]
        ends = self._poly_end[ref:ref + int(self._seg_n[k])].tolist()
        starts = [int(self._poly_end[ref - 1]) if ref else 0] + ends[:-1]
        return [self._coords[s:e] for s, e in zip(starts, ends)]

    def labels(self, stem: str, cat_map: Mapping[int, int]) -> list[int]:
        """Sorted class values (1..C-1, through ``cat_map`` of :func:`category_map`) of all the image's
        annotations, crowd annotations included."""
        r = self._r(stem)
        cats = self._cat[int(self._start[r]):int(self._start[r + 1])]
        out = set()
        for c in set(cats.tolist()):
            if c not in cat_map:
                raise DatasetError(f"{self.path}: image {stem!r} has category id {c}, which is not in the "
                                   f"category map ({first_few(sorted(cat_map))})")
            out.add(int(cat_map[c]))
        return sorted(out)


# --------------------------------------------------------------------------------------------- class masks

def _rle_size(seg: Mapping, h: int, w: int, ann_id: Any) -> None:
    size = [int(v) for v in seg["size"]]
    if size != [h, w]:
        raise DatasetError(f"annotation {ann_id}: its RLE is {size[0]}x{size[1]} (h x w) but the image is {h}x{w}")


def class_mask(h: int, w: int, anns: Sequence[Mapping], cat_map: Mapping[int, int], crowd: str = "ignore",
               overlap: str = "later") -> np.ndarray:
    """The uint8 (h, w) class mask of one image from its annotations (file order), painted in our convention.

    Decoding follows ``COCO.annToRLE`` / ``annToMask`` (pycocotools/coco.py) with pycocotools.mask: polygons via
    ``frPyObjects(polygons, h, w)`` then ``merge`` (the union of the parts); uncompressed RLE via
    ``frPyObjects(rle, h, w)``; compressed RLE as it is; then ``decode``. Polygons with fewer than 3 points (< 6
    numbers) enclose no pixel and are skipped (pycocotools would read a 4-number first polygon as a box); an empty
    segmentation paints nothing. An RLE whose ``size`` is not (h, w), or whose counts do not sum to h*w, is a
    DatasetError naming the annotation id.

    Painting (the references' COCO masks are an external download whose script is not published; this is ours):

    - background 0;
    - ``crowd="ignore"``: crowd regions (``iscrowd=1``) are painted 255 first, in file order, so instances drawn
      over a crowd region keep their class; ``crowd="class"``: crowd annotations are instances like any other
      (their class, in the painting order below);
    - ``overlap="later"``: instances in file order, a later annotation overwrites an earlier one where they overlap;
      ``overlap="smaller"``: in decreasing pixel area (``pycocotools.mask.area`` of the decoded RLE; ties keep file
      order), so smaller instances stay on top.

    ``cat_map``: category id -> class value (:func:`category_map`); an unknown category id is a DatasetError naming
    the annotation id.
    """
    from pycocotools import mask as mask_utils

    if crowd not in _CROWD_MODES:
        raise ValueError(f"crowd must be one of {_CROWD_MODES}, got {crowd!r}")
    if overlap not in _OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {_OVERLAP_MODES}, got {overlap!r}")
    h, w = int(h), int(w)
    out = np.zeros((h, w), dtype=np.uint8)
    if not anns:
        return out
    values, is_crowd, rles = [], [], []
    poly_parts: list[np.ndarray] = []  # all polygons of the image, rasterized in one frPyObjects call
    poly_of: list[tuple[int, int]] = []  # per polygon annotation: (its index in rles, its number of parts)
    for ann in anns:
        ann_id = ann.get("id")
        cid = ann.get("category_id")
        if cid not in cat_map:
            raise DatasetError(f"annotation {ann_id}: category id {cid} is not in the category map "
                               f"({first_few(sorted(cat_map))})")
        value = int(cat_map[cid])
        if not 0 < value < IGNORE_INDEX:
            raise ValueError(f"class value {value} of category {cid} is outside 1..{IGNORE_INDEX - 1}")
        seg = ann.get("segmentation")
        if isinstance(seg, (list, tuple)):
            parts = [p for p in seg if len(p) >= 6]
            if not parts:
                continue
            poly_of.append((len(rles), len(parts)))
            poly_parts.extend(parts)
            rle = None  # filled in below
        elif isinstance(seg, Mapping) and "counts" in seg and "size" in seg:
            _rle_size(seg, h, w, ann_id)
            if isinstance(seg["counts"], (str, bytes)):
                rle = seg  # compressed RLE
            else:
                counts = np.asarray(seg["counts"], dtype=np.int64)
                if int(counts.sum()) != h * w:
                    raise DatasetError(f"annotation {ann_id}: its RLE counts sum to {int(counts.sum())}, not "
                                       f"h*w = {h * w}")
                rle = mask_utils.frPyObjects({"counts": seg["counts"], "size": [h, w]}, h, w)
        else:
            raise DatasetError(f"annotation {ann_id}: segmentation is neither a polygon list nor an RLE dict")
        values.append(value)
        is_crowd.append(bool(ann.get("iscrowd", 0)))
        rles.append(rle)
    if poly_parts:
        parts_rle = mask_utils.frPyObjects(poly_parts, h, w)
        at = 0
        for k, n in poly_of:
            rles[k] = mask_utils.merge(parts_rle[at:at + n]) if n > 1 else parts_rle[at]
            at += n
    if not rles:
        return out
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2: "__array__ ... copy keyword"
        warnings.simplefilter("ignore", DeprecationWarning)
        masks = mask_utils.decode(rles)  # (h, w, n) uint8 0/1, Fortran order: each mask contiguous
    boxes = mask_utils.toBbox(rles)  # (n, 4) x, y, w, h: exact integers for RLEs
    n = len(rles)
    crowd_first = crowd == "ignore"
    inst = [k for k in range(n) if not (crowd_first and is_crowd[k])]
    if overlap == "smaller":
        area = mask_utils.area(rles)
        inst = sorted(inst, key=lambda k: -int(area[k]))  # stable: ties keep file order
    order = ([(k, IGNORE_INDEX) for k in range(n) if is_crowd[k]] if crowd_first else []) + \
        [(k, values[k]) for k in inst]
    for k, value in order:
        x, y, bw, bh = (int(v) for v in boxes[k])
        if bw == 0 or bh == 0:
            continue
        sub = masks[y:y + bh, x:x + bw, k].view(bool)
        np.copyto(out[y:y + bh, x:x + bw], np.uint8(value), where=sub)
    return out


# --------------------------------------------------------------------------------------------- tree check

def coco_tree_problems(root: str | os.PathLike) -> list[str]:
    """What is missing in a COCO 2014 tree (cheap: no per-image work); each problem names the path. Empty when the
    folders and instances files are there."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return [f"COCO root folder not found: {root}. {COCO_HOWTO}"]
    out = []
    for split, ann in _SPLITS.items():
        d = root / split
        if not d.is_dir():
            out.append(f"missing COCO image folder {d} (from {split}.zip)")
        else:
            with os.scandir(d) as it:
                if not any(e.name.lower().endswith(".jpg") for e in it):
                    out.append(f"COCO image folder {d} holds no .jpg files (unzip {split}.zip there)")
        p = root / "annotations" / ann
        if not p.is_file():
            out.append(f"missing COCO instances file {p} (from annotations_trainval2014.zip)")
    if out:
        out.append(COCO_HOWTO)
    return out


# --------------------------------------------------------------------------------------------- toy COCO

#: default (non-contiguous) category ids of the toy classes, in class order
_TOY_CATEGORY_IDS = (1, 3, 4, 7, 9, 12, 15, 18, 21, 24)

#: non-crowd encoding probabilities: polygon, uncompressed RLE, compressed RLE
_ENCODINGS = ("polygon", "rle", "compressed_rle")
_ENCODING_P = (0.6, 0.2, 0.2)
_CROWD_IMAGE_P = 0.25  # share of images (with >= 1 instance) whose one instance becomes a crowd region
_MIN_POLYGON_AREA = 8  # smaller components are written as RLE


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool (h, w) mask: column-major runs, starting with a (possibly empty) zero run."""
    flat = m.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(m.shape[0]), int(m.shape[1])]}


def _outline_polygons(m: np.ndarray) -> list[list[float]] | None:
    """Polygons along the pixel edges of a bool mask (pixel-corner coordinates, so pycocotools' rasterization,
    which takes a pixel whose centre is inside, gives the mask back), or None when the mask has a hole (COCO
    polygons cannot express holes) or an outline has fewer than 3 points.

    The outline is traced by ``cv2.findContours`` on the mask upsampled 2x (nearest), whose boundary pixels
    u = 2c (left side of pixel c) and u = 2c + 1 (right side) map to the corners c and c + 1: (u + 1) // 2."""
    import cv2

    up = np.repeat(np.repeat(m.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, hier = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hier is None or (hier[0][:, 3] >= 0).any():  # a contour with a parent is a hole
        return None
    polys = []
    for c in contours:
        pts = (c.reshape(-1, 2) + 1) // 2
        keep = np.ones(len(pts), bool)
        keep[1:] = (pts[1:] != pts[:-1]).any(1)
        pts = pts[keep]
        if len(pts) > 1 and (pts[0] == pts[-1]).all():
            pts = pts[:-1]
        if len(pts) < 3:
            return None
        polys.append([float(v) for v in pts.reshape(-1)])
    return polys or None


def _toy_split(toy_root: Path, split: str) -> list[str]:
    p = toy_root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not p.is_file():
        raise DatasetError(f"toy dataset list not found: {p} (make the toy dataset with "
                           "wsss_core.data.toy.make_toy_dataset)")
    return [x.strip() for x in p.read_text().splitlines() if x.strip()]


def write_toy_coco(toy_root: str | os.PathLike, out_root: str | os.PathLike,
                   category_ids: Sequence[int] | None = None, seed: int = 0, coco_categories: bool = False) -> dict:
    """Turn the toy VOC-format dataset (:func:`wsss_core.data.toy.make_toy_dataset`) into a COCO 2014-style tree.

    Writes (built in a folder next to ``out_root``, then each entry renamed into place, ``toy_coco.json`` (the
    generator parameters and this summary) last; other entries of ``out_root``, such as the toy dataset itself when
    it lies inside, are left alone)::

        out_root/train2014/COCO_train2014_<id:012d>.jpg    the toy train_aug images (JPEG bytes copied)
        out_root/val2014/COCO_val2014_<id:012d>.jpg        the toy val images
        out_root/annotations/instances_{train,val}2014.json

    - categories: the toy classes with non-contiguous ``category_ids`` (default 1, 3, 4, 7, 9, ...; increasing, so
      ``category_map(..., expected=None)`` gives back the toy's class values); with ``coco_categories`` instead
      COCO 2014's 80 categories (:data:`COCO_2014_IDS`, :data:`COCO_CLASSES`), toy class k being the k-th of them
      (person, bicycle, ...): the 81-class label space of real COCO, most classes never present;
    - instances: the 4-connected components of each class in the toy mask (``skimage.measure.label``); the toy's
      255 band (instance boundaries) belongs to no instance, so it reads back as background;
    - encodings (drawn from ``seed``): polygons along the pixel edges (about 60 %; components with a hole or under
      8 pixels cannot be polygons), uncompressed RLE and compressed RLE (string counts); on about a quarter of the
      images one instance is a crowd region (``iscrowd=1``, uncompressed RLE, id 900100000000 + image id as COCO's
      crowd ids). Each split with enough instances gets every encoding and at least one crowd region;
    - image ids are increasing but not contiguous; the ``images`` and ``annotations`` lists are shuffled (COCO's are
      not sorted by image); 2 extra images per split have no annotation (they are not in the id lists).

    Returns a summary: ``root``, ``classes``, ``category_ids``, ``splits`` (COCO split -> ``images`` (all),
    ``annotated``, ``empty`` (stems), ``annotations``, ``crowd``, ``encodings`` (encoding -> count), ``ids`` (toy id
    -> COCO stem)), ``encodings`` and ``crowd`` over both splits.
    """
    from pycocotools import mask as mask_utils
    from skimage.measure import label as cc_label

    from .io import read_label_png

    toy_root = Path(toy_root)
    classes_txt = toy_root / "classes.txt"
    if not classes_txt.is_file():
        raise DatasetError(f"toy dataset not found: {classes_txt} is missing (make it with "
                           "wsss_core.data.toy.make_toy_dataset)")
    classes = [c.strip() for c in classes_txt.read_text().splitlines() if c.strip()]
    n_cls = len(classes) - 1
    if coco_categories:
        category_ids = COCO_2014_IDS[:n_cls]
    cat_ids = list(_TOY_CATEGORY_IDS[:n_cls] if category_ids is None else category_ids)
    if len(cat_ids) != n_cls or any(int(c) < 1 for c in cat_ids) or any(b <= a for a, b in zip(cat_ids, cat_ids[1:])):
        raise ValueError(f"category_ids must be {n_cls} increasing positive ints (one per toy class), got {cat_ids}")
    rng = np.random.default_rng(seed)
    out_root = Path(out_root).absolute()
    out_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_root.parent / f"{out_root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (out_root / "toy_coco.json").unlink(missing_ok=True)
    summary: dict[str, Any] = {"root": str(out_root), "classes": classes, "category_ids": cat_ids, "splits": {}}
    try:
        for coco_split, toy_split, base in (("train2014", "train_aug", 9), ("val2014", "val", 42)):
            ids = _toy_split(toy_root, toy_split)
            n_img = len(ids) + 2
            image_ids = (base + np.cumsum(rng.integers(1, 60, n_img))).tolist()
            empty_pos = set(rng.choice(n_img, 2, replace=False).tolist())
            toy_rows = [p for p in range(n_img) if p not in empty_pos]
            (tmp / coco_split).mkdir(parents=True)
            images, per_image = [], []  # per_image: (image id, [(class, bool mask)]) of annotated toy images
            stems: dict[str, str] = {}
            size = None
            for toy_id, pos in zip(ids, toy_rows):
                img_id = image_ids[pos]
                stem = f"COCO_{coco_split}_{img_id:012d}"
                src = toy_root / "JPEGImages" / f"{toy_id}.jpg"
                if not src.is_file():
                    raise DatasetError(f"toy image not found: {src}")
                mask = read_label_png(toy_root / "SegmentationClass" / f"{toy_id}.png")
                size = mask.shape
                shutil.copyfile(src, tmp / coco_split / f"{stem}.jpg")
                images.append({"id": img_id, "file_name": f"{stem}.jpg", "height": int(mask.shape[0]),
                               "width": int(mask.shape[1])})
                comps = []
                for c in range(1, n_cls + 1):
                    lab, k = cc_label(mask == c, connectivity=1, return_num=True)
                    comps += [(c, lab == j) for j in range(1, k + 1)]
                per_image.append((img_id, comps))
                stems[toy_id] = stem
            h, w = size if size is not None else (64, 64)
            empty = []
            for pos in sorted(empty_pos):
                img_id = image_ids[pos]
                stem = f"COCO_{coco_split}_{img_id:012d}"
                flat = rng.integers(60, 200, 3)
                noise = rng.normal(0.0, 12.0, (h, w, 3))
                write_image(tmp / coco_split / f"{stem}.jpg", np.clip(flat + noise, 0, 255).astype(np.uint8))
                images.append({"id": img_id, "file_name": f"{stem}.jpg", "height": int(h), "width": int(w)})
                empty.append(stem)

            # encodings: crowd on some images, then a random draw per instance, then every encoding at least once
            plan = []  # [image index, component index, encoding, crowd]
            for i, (_, comps) in enumerate(per_image):
                crowd_j = int(rng.integers(len(comps))) if comps and rng.random() < _CROWD_IMAGE_P else -1
                for j, (_, m) in enumerate(comps):
                    can_poly = int(m.sum()) >= _MIN_POLYGON_AREA and _outline_polygons(m) is not None
                    p = np.array(_ENCODING_P if can_poly else (0.0, 0.5, 0.5))
                    enc = "rle" if j == crowd_j else _ENCODINGS[int(rng.choice(3, p=p / p.sum()))]
                    plan.append([i, j, enc, j == crowd_j, can_poly])
            if plan and not any(x[3] for x in plan) and len(plan) > 3:
                x = plan[int(rng.integers(len(plan)))]
                x[2], x[3] = "rle", True
            for enc in _ENCODINGS:
                free = [x for x in plan if not x[3] and (x[4] or enc != "polygon")]
                counts = {e: sum(1 for x in free if x[2] == e) for e in _ENCODINGS}
                if counts[enc] == 0:
                    donors = [x for x in free if counts[x[2]] > 1]
                    if donors:
                        donors[int(rng.integers(len(donors)))][2] = enc

            anns, n_enc, n_crowd, next_id = [], dict.fromkeys(_ENCODINGS, 0), 0, 1
            for i, j, enc, is_crowd, _ in plan:
                img_id, comps = per_image[i]
                c, m = comps[j]
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                if enc == "polygon":
                    seg: Any = _outline_polygons(m)
                elif enc == "rle":
                    seg = _uncompressed_rle(m)
                else:
                    seg = {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}
                ann_id = 900100000000 + img_id if is_crowd else next_id
                next_id += 0 if is_crowd else 1
                anns.append({"id": int(ann_id), "image_id": int(img_id), "category_id": int(cat_ids[c - 1]),
                             "iscrowd": int(is_crowd), "area": float(mask_utils.area(rle)),
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": seg})
                n_enc[enc] += 1
                n_crowd += int(is_crowd)
            images = [images[k] for k in rng.permutation(len(images)).tolist()]
            anns = [anns[k] for k in rng.permutation(len(anns)).tolist()]
            doc = {"info": {"description": "wsss-flow toy COCO (synthetic; from the toy VOC-format dataset "
                                           f"{toy_root.name}, split {toy_split})", "version": "1.0"},
                   "licenses": [], "images": images, "annotations": anns,
                   "categories": [{"id": int(cid), "name": name, "supercategory": "toy"}
                                  for cid, name in (zip(COCO_2014_IDS, COCO_CLASSES[1:]) if coco_categories
                                                    else zip(cat_ids, classes[1:]))]}
            write_text(tmp / "annotations" / _SPLITS[coco_split], json.dumps(doc, separators=(",", ":")) + "\n")
            summary["splits"][coco_split] = {
                "images": len(images), "annotated": sum(1 for _, c in per_image if c), "empty": empty,
                "annotations": len(anns),
                "crowd": n_crowd, "encodings": n_enc, "ids": stems}
        summary["encodings"] = {e: sum(s["encodings"][e] for s in summary["splits"].values()) for e in _ENCODINGS}
        summary["crowd"] = sum(s["crowd"] for s in summary["splits"].values())
        write_json(tmp / "toy_coco.json", {
            "name": "wsss-flow toy COCO", "generator": "wsss_core.data.coco.write_toy_coco",
            "params": {"toy_root": str(toy_root), "category_ids": cat_ids, "seed": seed},
            **{k: v for k, v in summary.items() if k != "root"}})
        # Move our entries into out_root (other entries, e.g. the toy VOC folder itself, stay); the summary file,
        # removed at the start, comes last, so its presence means a complete tree.
        out_root.mkdir(parents=True, exist_ok=True)
        for name in ("train2014", "val2014", "annotations", "toy_coco.json"):
            dst = out_root / name
            if dst.is_dir() and not dst.is_symlink():
                os.replace(dst, tmp / f"{name}.old")
            os.replace(tmp / name, dst)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(Exception):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def write_placeholder_tree(root: str | os.PathLike, split_stems: Mapping[str, Sequence[str]],
                           size: tuple[int, int] = (480, 640)) -> None:
    """A COCO-shaped tree for DAG checks and benchmarks: ``<root>/<split>2014/<stem>.jpg`` as empty files and
    ``<root>/annotations/instances_<split>2014.json`` with one image per stem (``size`` = (h, w)), one person
    triangle each, and the 80 categories with COCO 2014's ids. Nothing in it can be trained on."""
    import json

    root = Path(root)
    cats = [{"id": i, "name": n} for i, n in zip(COCO_2014_IDS, COCO_CLASSES[1:])]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, stems in split_stems.items():
        folder = root / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        for s in stems:
            (folder / f"{s}.jpg").touch()
        images = [{"id": k, "file_name": f"{s}.jpg", "height": size[0], "width": size[1]} for k, s in enumerate(stems)]
        anns = [{"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
                 "segmentation": [[0, 0, 1, 0, 1, 1]]} for k in range(len(stems))]
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
