"""Stages: generate the toy dataset; prepare lists, labels and manifest of any dataset."""

from __future__ import annotations

from pathlib import Path

from ..data.prepare import prepare_dataset
from ..data.toy import make_toy_dataset
from ..engine.logs import setup_job_logging
from .job import Files, JobSettings


def make_toy(job: JobSettings, inp: Files, out: Files) -> dict:
    """Generate the toy dataset (``extra.generator``: generator settings) into ``out.root``."""
    logger = setup_job_logging(job.log)
    if job.extra.get("format") == "coco":  # a COCO-style tree made from the toy VOC-format data
        from ..data.coco import write_toy_coco

        voc = Path(out.root) / "voc"
        make_toy_dataset(voc, **dict(job.extra["generator"]))
        summary = write_toy_coco(voc, out.root, seed=int(dict(job.extra["generator"]).get("seed", 0)),
                                 coco_categories=True)   # COCO's 81-class label space
    else:
        summary = make_toy_dataset(out.root, **dict(job.extra["generator"]))
    logger.info("toy dataset written to %s: %s", out.root, summary)
    return summary


def prepare(job: JobSettings, inp: Files, out: Files) -> dict:
    """Lists, image-level labels and manifest of dataset ``extra.ds`` into the folder of ``out.manifest``."""
    logger = setup_job_logging(job.log)
    manifest = prepare_dataset(job.extra["ds"], job.dataset, str(Path(out.manifest).parent), n_workers=job.threads,
                               coco_markers=inp.get("coco_masks"))
    logger.info("prepared %s: splits %s, labels from %s", job.dataset, manifest["splits"], manifest["label_source"])
    return manifest


def make_saliency(job: JobSettings, inp: Files, out: Files) -> None:
    """Saliency stage: stand-in maps for the toy dataset, a verified folder of precomputed maps otherwise."""
    from ..data.saliency import saliency_manifest

    logger = setup_job_logging(job.log)
    man = saliency_manifest(job.extra["ds"], job.prepared, [job.split("train")], out.manifest, job.seed)
    logger.info("saliency (%s): %d maps in %s", man["kind"], man["n_maps"], man["dir"])


def coco_masks(job: JobSettings, inp: Files, out: Files) -> dict:
    """One shard of a COCO split's class masks from its instances file ``extra.instances``.

    The split's ids are the file's images with at least one annotation (sorted stems; COCO 2014: 82,081 train,
    40,137 val), split into ``job.n_shards`` contiguous chunks; this job writes its chunk's masks
    (:func:`wsss_core.data.coco.class_mask`, ``extra.masks``: ``crowd``, ``overlap``) as index PNGs into the folder
    ``masks/`` beside the split's folder (atomic writes), then ``out.marker``: the ids, their image-level labels,
    the class names and the conventions used (prepare_dataset reads the markers of every shard)."""
    from ..data.coco import COCO_CLASSES, CocoIndex, category_map, class_mask, classes_from_categories
    from ..data.io import write_label_png
    from ..engine.logs import progress
    from ..store.atomic import write_json
    from ..store.shards import shard_ids

    logger = setup_job_logging(job.log)
    split, conv = job.wildcards["split"], dict(job.extra.get("masks") or {})
    crowd, overlap = conv.get("crowd", "ignore"), conv.get("overlap", "later")
    index = CocoIndex.load(job.extra["instances"])
    # a user's file must hold COCO's 80 categories in id order; the toy data's names are not checked
    cat_map = category_map(index.categories, expected=None if job.extra.get("toy") else COCO_CLASSES)
    classes = classes_from_categories(index.categories)
    stems = index.stems()
    ids = shard_ids(stems, job.shard, job.n_shards)
    mask_dir = Path(out.marker).parent.parent / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    labels = {}
    for stem in progress(ids, desc=f"coco masks {split} {job.shard + 1}/{job.n_shards}"):
        h, w = index.size(stem)
        mask = class_mask(h, w, index.annotations(stem), cat_map, crowd=crowd, overlap=overlap)
        write_label_png(mask_dir / f"{stem}.png", mask)
        labels[stem] = index.labels(stem, cat_map)
    marker = {"split": split, "shard": job.shard, "n_shards": job.n_shards, "config_hash": job.config_hash,
              "annotations": str(job.extra["instances"]), "classes": classes, "ids": ids, "labels": labels,
              "n_images_in_file": index.n_images, "n_with_objects": len(stems),
              "crowd": crowd, "overlap": overlap}
    write_json(out.marker, marker)
    logger.info("%s shard %d/%d: %d masks into %s (%d of the file's %d images have objects)", split, job.shard + 1,
                job.n_shards, len(ids), mask_dir, len(stems), index.n_images)
    return marker

