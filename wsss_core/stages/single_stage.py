"""Stages of single-stage methods (RTC): the method's own segmentation output on a split, and its CRF labels.

A method is single-stage when its module defines ``infer_seg(model, image, scales, flip, device, keys=None) ->
(keys (K,), maps float32 (K, H, W))`` (foreground score maps; the background is a threshold on them) and the
experiment turns on ``stages.single_stage.enabled``. The maps are stored as a CAM shard (kind ``cams``), so the
threshold curve (``eval_cams``), the CRF (:func:`wsss_core.stages.refine.label_maps`) and the report read them as
they read CAMs; the pipeline's artifacts ``ss_maps``, ``ss_eval``, ``ss_crf``, ``ss_crf_eval`` and ``ss_masks``
(:mod:`wsss_core.pipeline`) say where each lives.
"""

from __future__ import annotations

from ..data.io import read_image
from ..data.prepare import DatasetInfo
from ..engine.logs import progress
from ..errors import ConfigError
from ..store.shards import ShardWriter, shard_ids
from .classifier import load_method_model
from .job import Files, JobSettings
from .refine import label_maps


def infer_single_stage(job: JobSettings, inp: Files, out: Files) -> None:
    """One shard (wildcards ``split``, ``shard``, ``nshards``) of the single-stage maps of the classifier
    ``inp.model`` into ``out.maps``: every class gated by the predicted class scores (``gate: scores``, the
    reference) or the image's labelled classes (``gate: labels``)."""
    cfg, split, shard, n_shards = job.cfg, job.wildcards["split"], job.shard, job.n_shards
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    m, model, meta = load_method_model(inp.model, run.device, job.weights_dir)
    if not hasattr(m, "infer_seg"):
        raise ConfigError(f"experiment {job.experiment!r}: method {meta['method']!r} has no segmentation output of "
                          "its own (its module defines no infer_seg); set stages.single_stage.enabled: false")
    by_labels = cfg.get("gate", "scores") == "labels"
    ids = shard_ids(info.ids(split), shard, n_shards)
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "scales": list(cfg["scales"]), "flip": bool(cfg["flip"]), "gate": cfg.get("gate", "scores"),
             "model": str(inp.model), "method": meta["method"], "classes": info.classes, "output": "single_stage"}
    with ShardWriter(out.maps, "cams", attrs) as writer:
        for image_id in progress(ids, desc=f"single-stage {split} {shard + 1}/{n_shards}"):
            image = read_image(info.image_path(image_id))
            keys, maps = m.infer_seg(model, image, cfg["scales"], cfg["flip"], run.device,
                                     keys=info.labels(image_id) if by_labels else None)
            writer.add_cams(image_id, keys, maps)
    run.logger.info("wrote %d single-stage maps to %s", len(ids), out.maps)


def single_stage_crf(job: JobSettings, inp: Files, out: Files) -> None:
    """One shard of CRF labels of the single-stage maps ``inp.maps`` with the background threshold chosen in
    ``inp.ss_eval`` (``stages.single_stage.crf``): on the split of the ``split`` wildcard (the eval split), or, for
    the pseudo-masks of ``refine: single_stage``, the train split."""
    split = job.wildcards.get("split") or job.split("train")
    label_maps(job, dict(job.cfg.get("crf") or {}), inp.maps, inp.ss_eval, out.masks, split, crf=True)
