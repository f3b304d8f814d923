"""Saliency maps, a dataset artifact used by EPS-style methods (PPC-EPS, FSAE on PPC).

Two sources, recorded in ``saliency/manifest.json`` so the report can say which one was used:

- ``folder`` (VOC / COCO): precomputed off-the-shelf saliency maps (PoolNet / PFAN, the ``SALImages`` of EPS),
  one ``<id>.png`` per training image, 8-bit grey or RGB. :func:`check_saliency_folder` verifies the folder and
  names what is missing.
- ``stand-in`` (toy dataset only): the toy dataset has no saliency model, so :func:`standin_saliency` makes a
  *degraded, class-agnostic* map from the ground-truth foreground (blurred, with random erosion/dilation and
  low-frequency noise). It stands in for what a salient-object detector gives and is labelled as such in the
  report; it carries no class information.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ..errors import DatasetError, first_few
from ..store.atomic import write_json
from .io import IGNORE_INDEX, read_label_png, write_image
from .prepare import SALIENCY_HOWTO, DatasetInfo

def standin_saliency(mask: np.ndarray, rng: np.random.Generator, blur_sigma: float = 2.0,
                     noise: float = 0.15) -> np.ndarray:
    """Degraded class-agnostic saliency from a label map: uint8 (H, W) -> uint8 (H, W) in 0..255.

    Foreground = labels 1..254 (the 255 boundary band counts as half salient); a random 3x3 erosion or dilation
    (or neither), a Gaussian blur of ``blur_sigma`` px and smooth noise of amplitude ``noise`` mimic the blurry,
    partly wrong maps of a salient-object detector.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    fg = ((mask > 0) & (mask != IGNORE_INDEX)).astype(np.float32) + 0.5 * (mask == IGNORE_INDEX)
    op = int(rng.integers(0, 3))
    kernel = np.ones((3, 3), np.uint8)
    if op == 1:
        fg = cv2.erode(fg, kernel)
    elif op == 2:
        fg = cv2.dilate(fg, kernel)
    fg = cv2.GaussianBlur(fg, (0, 0), blur_sigma)
    h, w = mask.shape
    low = rng.uniform(-1, 1, size=(max(2, h // 16), max(2, w // 16))).astype(np.float32)
    fg = fg + noise * cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return (np.clip(fg, 0, 1) * 255).round().astype(np.uint8)


def make_standin_saliency(prepared: str | os.PathLike, splits: Sequence[str], out_dir: str | os.PathLike,
                          seed: int = 0) -> dict[str, Any]:
    """Write stand-in maps ``out_dir/maps/<id>.png`` for the ids of ``splits``; returns the manifest dict."""
    info = DatasetInfo(prepared)
    maps = Path(out_dir) / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    ids = sorted({i for s in splits for i in info.ids(s)})
    for k, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, k])
        sal = standin_saliency(read_label_png(info.mask_path(image_id)), rng)
        write_image(maps / f"{image_id}.png", np.repeat(sal[..., None], 3, axis=2))
    return {"kind": "stand-in", "dir": str(maps), "ext": ".png", "n_maps": len(ids), "seed": seed,
            "description": "stand-in saliency: degraded, class-agnostic foreground of the toy ground truth "
                           "(blur, random erosion/dilation, smooth noise); not a saliency model"}


def check_saliency_folder(folder: str | os.PathLike, ids: Sequence[str], ext: str = ".png") -> list[str]:
    """Ids of ``ids`` whose ``folder/<id><ext>`` is missing (raises DatasetError if the folder is missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"saliency folder {folder.resolve()} does not exist. {SALIENCY_HOWTO}")
    present = {p.name for p in os.scandir(folder)}
    return [i for i in ids if f"{i}{ext}" not in present]


def saliency_manifest(dataset_cfg: dict, prepared: str | os.PathLike, splits: Sequence[str], out: str | os.PathLike,
                      seed: int = 0) -> dict[str, Any]:
    """The saliency stage: stand-in maps for the toy dataset, a verified folder otherwise; writes ``out``."""
    out = Path(out)
    if dataset_cfg["kind"] == "toy" or dataset_cfg.get("generator"):  # the toy data, VOC or COCO format
        man = make_standin_saliency(prepared, splits, out.parent, seed)
    else:
        sal = dataset_cfg.get("saliency") or {}
        info = DatasetInfo(prepared)
        name = info.manifest.get("name", "<name>")
        if not sal.get("dir"):
            raise DatasetError(f"this experiment needs saliency maps, but datasets.{name}.saliency.dir is not set. "
                               f"{SALIENCY_HOWTO}")
        ids = sorted({i for s in splits for i in info.ids(s)})
        ext = sal.get("ext", ".png")
        missing = check_saliency_folder(sal["dir"], ids, ext)
        if missing:
            folder = Path(sal["dir"]).expanduser().resolve()
            raise DatasetError(
                f"saliency folder {folder} (datasets.{name}.saliency.dir) lacks {len(missing)} of the {len(ids)} "
                f"maps of split(s) {', '.join(splits)} (one <id>{ext} per image): {first_few(missing, 8)}. Fix: add "
                f"the missing maps (e.g. {folder / (missing[0] + ext)}), or point datasets.{name}.saliency.dir "
                f"(and .ext) at a complete folder of maps for this dataset. {SALIENCY_HOWTO}")
        man = {"kind": "folder", "dir": str(sal["dir"]), "ext": ext, "n_maps": len(ids),
               "description": sal.get("description", "precomputed saliency maps")}
    write_json(out, man)
    return man


def read_saliency(folder: str | os.PathLike, image_id: str, ext: str = ".png") -> np.ndarray:
    """uint8 (H, W) saliency of an image (channel mean of an RGB map), with a clear error if unreadable."""
    path = Path(folder) / f"{image_id}{ext}"
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read saliency map {path} (missing or corrupt). {SALIENCY_HOWTO}")
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2).round().astype(np.uint8)
    return img
