"""Stages: import CAMs and pseudo-masks written by the reference WSSS repositories, and export a run in their layouts.

- :func:`import_cams`: one CAM shard (wildcards ``split``, ``shard``, ``nshards``) from a folder of per-image
  ``{id}.npy`` files (formats psa, irn, sipe, dense: :mod:`wsss_core.store.exchange`), so that eval_cams, the CRF,
  AffinityNet and IRN stages run on CAMs made elsewhere.
- :func:`import_masks`: one pseudo-mask shard of the ``train`` split from a folder of ``{id}.png`` label maps.
- :func:`export_run`: a run's CAM and pseudo-mask shards as ``cams/{id}.npy`` + ``pseudo_masks/{id}.png`` +
  ``manifest.json`` (what it holds, where it comes from, and the config block that imports it back).

Every file is checked (shape against the image, keys, values; :mod:`wsss_core.store.exchange`): a bad one ends the
job with a :class:`~wsss_core.errors.DataError` naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..data.io import image_size
from ..data.prepare import DatasetInfo
from ..engine.logs import progress, setup_job_logging
from ..errors import ConfigError, DataError, first_few
from ..store import exchange as ex
from ..store.atomic import atomic_dir, read_json, write_json
from ..store.shards import ShardedStore, ShardWriter, attr_value, shard_ids
from .job import Files, JobSettings

#: manifest keys this stage writes itself (``job.extra`` items may not replace them)
_MANIFEST_KEYS = ("format_version", "dataset", "experiment", "config_hash", "classes", "threshold", "cams",
                  "pseudo_masks", "import")


def _check_files(folder: Path, ids: Sequence[str], path_of, split: str, what: str) -> None:
    """A DataError naming the expected path, id and split of the first missing file (and how many are missing)."""
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist (import dir of split {split!r}); expected one file "
                        f"per image, e.g. {path_of(folder, ids[0]) if ids else folder / '<id>'}")
    missing = [i for i in ids if not path_of(folder, i).is_file()]
    if missing:
        raise DataError(f"{what} file {path_of(folder, missing[0])} of image {missing[0]!r} (split {split!r}) does "
                        f"not exist: {len(missing)} of the {len(ids)} images of this shard have no file in {folder} "
                        f"({first_few(missing)}); expected one file per image id of the split")


def import_cams(job: JobSettings, inp: Files, out: Files) -> None:
    """One CAM shard ``out.cams`` (``job.shard`` of ``job.n_shards`` of split ``job.wildcards['split']``) from the
    per-image files of ``job.cfg``: ``dir``, ``format`` (psa | irn | sipe | dense, default psa), ``classes``
    (labels | all, default labels), ``bg`` (threshold | own; default the format's own)."""
    logger = setup_job_logging(job.log)
    opts = ex.cam_import_options(job.cfg)
    split, shard, n_shards = job.wildcards["split"], job.shard, job.n_shards
    info = DatasetInfo(job.prepared)
    ids = shard_ids(info.ids(split), shard, n_shards)
    folder = Path(opts["dir"])
    _check_files(folder, ids, ex.cam_file, split, f"{opts['format']} CAM")
    logger.info("importing %d %s CAMs of %s from %s (classes %s, bg %s)", len(ids), opts["format"], split, folder,
                opts["classes"], opts["bg"])
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "method": "imported", "imported_from": str(folder), "format": opts["format"],
             "import_classes": opts["classes"], "import_bg": opts["bg"], "classes": info.classes}
    with ShardWriter(out.cams, "cams", attrs) as writer:
        for image_id in progress(ids, desc=f"import cams {split} {shard + 1}/{n_shards}"):
            labels = None
            if opts["classes"] == "labels":
                try:
                    labels = info.labels(image_id)
                except KeyError:
                    raise DataError(f"image {image_id!r} of split {split!r} has no image-level labels in "
                                    f"{info.dir / 'labels.json'}; classes: labels needs them (use classes: all)") \
                        from None
            c = ex.read_reference_cams(ex.cam_file(folder, image_id), opts["format"], info.n_classes,
                                       size=image_size(info.image_path(image_id)), labels=labels,
                                       classes=opts["classes"], bg=opts["bg"], class_names=info.classes)
            writer.add_cams(image_id, c.keys, c.cams, c.aux)
    logger.info("wrote %d imported CAMs to %s", len(ids), out.cams)


def import_masks(job: JobSettings, inp: Files, out: Files) -> None:
    """One pseudo-mask shard ``out.masks`` (``job.shard`` of ``job.n_shards`` of the ``train`` split) from the
    ``{id}.png`` label maps of ``job.cfg``: ``dir``, ``format`` (png)."""
    logger = setup_job_logging(job.log)
    opts = ex.mask_import_options(job.cfg)
    split, shard, n_shards = job.split("train"), job.shard, job.n_shards
    info = DatasetInfo(job.prepared)
    ids = shard_ids(info.ids(split), shard, n_shards)
    folder = Path(opts["dir"])
    _check_files(folder, ids, ex.mask_file, split, "pseudo-mask")
    logger.info("importing %d pseudo-masks of %s from %s", len(ids), split, folder)
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "refine": "imported", "imported_from": str(folder), "format": opts["format"],
             "bg_threshold_source": f"none: pseudo-masks imported from {folder}"}
    with ShardWriter(out.masks, "masks", attrs) as writer:
        for image_id in progress(ids, desc=f"import masks {shard + 1}/{n_shards}"):
            writer.add_mask(image_id, ex.read_reference_mask(ex.mask_file(folder, image_id), info.n_classes,
                                                             size=image_size(info.image_path(image_id))))
    logger.info("wrote %d imported pseudo-masks to %s", len(ids), out.masks)


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else [str(p) for p in value]


def _first_keys(stores: Sequence[ShardedStore]) -> tuple[bool, bool]:
    """(background map, aux stack) of the first image with maps, across ``stores``."""
    for store in stores:
        for image_id in store.ids():
            keys = store.keys(image_id)
            if keys.size:
                return bool(keys[0] == 0), store.aux(image_id) is not None
    return False, False


def export_run(job: JobSettings, inp: Files, out: Files) -> dict:
    """Write the CAM shards ``inp.cams`` (any splits) and pseudo-mask shards ``inp.masks`` to the new folder
    ``out.dir``::

        cams/{id}.npy           format job.cfg["cam_format"]: auto (sipe with a background map, else psa) | psa |
                                irn | sipe; float32, the shard's values
        pseudo_masks/{id}.png   VOC-palette index PNG
        manifest.json           dataset, experiment, config hash, job.extra's items (provenance, config hashes),
                                classes, the threshold entry of inp.cam_eval, formats and their reference code,
                                counts and ids per split, and the config block that imports the folder back

    An id in several shards (e.g. of train and train_aug) is written once, from the first shard that has it.
    The folder is built beside ``out.dir`` and renamed into place last: a killed job leaves no folder that looks
    complete. Returns the manifest."""
    logger = setup_job_logging(job.log)
    cam_paths, mask_paths = _paths(inp.get("cams")), _paths(inp.get("masks"))
    clash = sorted(set(job.extra) & set(_MANIFEST_KEYS))
    if clash:
        raise ConfigError(f"export: job.extra keys {clash} would replace manifest entries of the same name")
    final = Path(out.dir)
    with atomic_dir(final) as tmp:
        manifest = _export_into(job, tmp, final, cam_paths, mask_paths, inp.get("cam_eval"))
    logger.info("exported %d CAMs (%s) and %d pseudo-masks to %s", manifest["cams"]["n_images"],
                manifest["cams"]["format"], manifest["pseudo_masks"]["n_images"], final)
    return manifest


def _export_into(job: JobSettings, tmp: Path, final: Path, cam_paths: list[str], mask_paths: list[str],
                 cam_eval: str | None) -> dict:
    with contextlib.ExitStack() as stack:
        # one store over all: checks every shard and that the shards of one folder are one set
        stack.enter_context(ShardedStore(cam_paths, kind="cams"))
        stack.enter_context(ShardedStore(mask_paths, kind="masks"))
        cam_stores = [stack.enter_context(ShardedStore([p], kind="cams")) for p in cam_paths]
        mask_stores = [stack.enter_context(ShardedStore([p], kind="masks")) for p in mask_paths]
        if job.prepared:
            classes = DatasetInfo(job.prepared).classes
        elif cam_stores and "classes" in cam_stores[0].attrs:
            classes = _read_classes(cam_stores[0].attrs["classes"])
        else:
            classes = None
        has_bg, has_aux = _first_keys(cam_stores)
        fmt = ex.export_cam_format(job.cfg.get("cam_format", "auto"), has_bg, has_aux)

        def write_cams(path: str, store: ShardedStore, image_id: str) -> None:
            keys, cams = store[image_id]
            try:
                ex.write_reference_cams(ex.cam_file(tmp / "cams", image_id), fmt, keys, cams, store.aux(image_id))
            except ConfigError as exc:  # an image unlike the first (background map, aux)
                raise DataError(f"HDF5 shard {path}, image {image_id!r} (keys {keys.tolist()}): {exc}") from None

        def write_mask(path: str, store: ShardedStore, image_id: str) -> None:
            ex.write_reference_mask(ex.mask_file(tmp / "pseudo_masks", image_id), store[image_id])

        cam_splits, written = _export_items(cam_paths, cam_stores, "cams", write_cams)
        (tmp / "cams").mkdir(exist_ok=True)
        mask_splits, masks_written = _export_items(mask_paths, mask_stores, "masks", write_mask)
        (tmp / "pseudo_masks").mkdir(exist_ok=True)

    threshold = read_json(cam_eval).get("threshold") if cam_eval else None
    bg = "own" if has_bg else "threshold"
    manifest: dict[str, Any] = {
        "format_version": 1,
        "dataset": job.dataset,
        "experiment": job.experiment,
        "config_hash": job.config_hash,
        **job.extra,
        "classes": classes,
        "threshold": threshold,
        "cams": {"dir": "cams", "files": "{id}.npy", "format": fmt, "reference": ex.FORMAT_REFERENCES[fmt],
                 "dtype": "float32", "background_map": has_bg, "aux": has_aux, "n_images": len(written),
                 "splits": {s: {"n_images": len(v), "ids": sorted(v)} for s, v in cam_splits.items()},
                 "shards": cam_paths},
        "pseudo_masks": {"dir": "pseudo_masks", "files": "{id}.png", "format": "png",
                         "reference": ex.FORMAT_REFERENCES["png"], "n_images": len(masks_written),
                         "splits": {s: {"n_images": len(v), "ids": sorted(v)} for s, v in mask_splits.items()},
                         "shards": mask_paths},
        # the config block that imports this folder back (classes: all keeps exactly the maps exported)
        "import": {"cams": {"dir": str(final / "cams"), "format": fmt, "classes": "all", "bg": bg},
                   "pseudo_masks": {"dir": str(final / "pseudo_masks"), "format": "png"}},
    }
    write_json(tmp / "manifest.json", manifest)
    return manifest


def _export_items(paths: Sequence[str], stores: Sequence[ShardedStore], what: str,
                  write) -> tuple[dict[str, list[str]], set[str]]:
    """``write(path, store, id)`` once per image id of the shards (an id in several splits, e.g. train and
    train_aug, is written once); returns the ids of each split (shard attr ``split``) and the ids written."""
    splits: dict[str, list[str]] = {}
    written: set[str] = set()
    for path, store in zip(paths, stores):
        ids = splits.setdefault(str(attr_value(store.attrs.get("split", "unknown"))), [])
        for image_id in progress(store.ids(), desc=f"export {what} {Path(path).name}"):
            ids.append(image_id)
            if image_id not in written:
                write(path, store, image_id)
                written.add(image_id)
    return splits, written


def _read_classes(value: Any) -> list[str]:
    """The ``classes`` attr of a shard (a JSON list, as ShardWriter stores lists) as a list of names."""
    value = attr_value(value)
    return list(json.loads(value)) if isinstance(value, str) else [str(v) for v in value]
