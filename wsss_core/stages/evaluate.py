"""Stages: evaluate CAMs (threshold curve, chosen background threshold) and label masks (pseudo-masks, predictions)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..data.io import read_label_png
from ..data.prepare import DatasetInfo
from ..engine.logs import get_logger, progress, setup_job_logging
from ..errors import ConfigError, DataError
from ..metrics import SEARCHES, ConfusionMatrix, ThresholdCurve, scores_from_confusion, search_criterion
from ..store.atomic import write_json
from ..store.shards import ShardedStore
from .job import Files, JobSettings


def _thresholds(cfg: Mapping[str, Any]) -> np.ndarray:
    t = cfg["thresholds"]
    n = int(round((t["stop"] - t["start"]) / t["step"]))
    return np.round(t["start"] + t["step"] * np.arange(n), 6)


def _curve(store: ShardedStore, info: DatasetInfo, ids: Sequence[str], thresholds: np.ndarray, desc: str) -> ThresholdCurve:
    curve = ThresholdCurve(info.n_classes, thresholds)
    for image_id in progress(ids, desc=desc):
        keys, cams = store[image_id]
        gt = read_label_png(info.mask_path(image_id), info.n_classes)
        if gt.shape != cams.shape[1:]:
            raise DataError(f"mask {info.mask_path(image_id)} is {gt.shape}, its CAM {cams.shape[1:]}")
        curve.update(gt, cams, keys)
    return curve


def has_bg_maps(store: ShardedStore) -> bool:
    """Whether a CAM store holds background maps (keys start with 0, e.g. SIPE's IS-CAM); checks one image."""
    for image_id in store.ids()[:16]:
        keys = store.keys(image_id)
        if keys.size:
            return int(keys[0]) == 0
    return False


def eval_cams(job: JobSettings, inp: Files, out: Files) -> dict:
    """Background-threshold curve of the CAM shards ``inp.cams`` on the ``threshold`` split, scores on the ``eval``
    split at the chosen threshold, into ``out.json``: :func:`cam_scores`."""
    setup_job_logging(job.log)
    return cam_scores(job.prepared, inp.cams, job.split("threshold"), job.split("eval"), job.cfg, out.json)


def cam_scores(prepared: str, cam_shards: Sequence[str], threshold_split: str, eval_split: str,
               cfg: Mapping[str, Any], out: str) -> dict:
    """Background-threshold curve on ``threshold_split`` (the chosen t is picked by ``cfg['search']``), scores on
    ``eval_split`` (and ``threshold_split``) at t.

    ``cfg``: ``stages.eval`` {thresholds {start, stop, step}, mean present|strict, search grid|greedy}. ``grid``
    (default) takes the argmax of the whole curve; ``greedy`` MCTformer's ``--curve`` rule, the first local
    maximum (a walk up the thresholds that stops at the first non-improvement), read off the same one-pass curve.

    Writes JSON: ``threshold`` {value, own_bg, source {split, criterion, search, miou_at_value,
    swept_on_reported_split}}, ``curves`` {split: curve}, ``scores`` {split: scores at t, plus
    ``threshold_chosen_on_this_split``}. A score is *chosen on this split* when t was swept on the split it is
    reported on (optimistic; MCTformer's seed protocol sweeps and reports on ``train``);
    ``swept_on_reported_split`` says so for ``eval_split``. CAMs with their own background map (``own_bg``) are
    not swept: both flags are false and ``search`` is ``"none"``.
    """
    logger = get_logger()
    info = DatasetInfo(prepared)
    strict = cfg.get("mean", "present") == "strict"
    search = cfg.get("search", "grid")
    if search not in SEARCHES:
        raise ConfigError(f"stages.eval.search must be one of {SEARCHES}, got {search!r}")
    result: dict[str, Any] = {"classes": info.classes, "mean": cfg.get("mean", "present"), "curves": {}, "scores": {}}
    with ShardedStore(cam_shards, kind="cams") as store:
        own_bg = has_bg_maps(store)
        # CAMs with their own background map (SIPE/SFC IS-CAM, key 0): pred = keys[argmax], which is the
        # t = 0 point of the curve (a pixel is labelled by its strongest map, bg included); no sweep.
        thresholds = np.array([0.0]) if own_bg else _thresholds(cfg)
        curves = {}
        for split in dict.fromkeys([threshold_split, eval_split]):
            ids = [i for i in info.ids(split) if i in store]
            if not ids:
                raise DataError(f"no CAMs of split {split!r} in {list(cam_shards)}")
            curves[split] = _curve(store, info, ids, thresholds, f"eval cams {split}")
            result["curves"][split] = curves[split].result(info.classes, strict=strict, search=search)
            result["curves"][split]["n_images"] = len(ids)
        chosen = result["curves"][threshold_split]
        t_best = chosen["best_t"]
        criterion = search_criterion(search, "strict" if strict else "present-class", thresholds)
        if own_bg:
            criterion = "none: the CAMs carry their own background map (pred = argmax over [bg, classes])"
        result["threshold"] = {"value": t_best, "own_bg": own_bg,
                               "source": {"split": threshold_split, "criterion": criterion,
                                          "search": "none" if own_bg else search,
                                          "miou_at_value": chosen["best_miou"],
                                          "swept_on_reported_split": not own_bg and threshold_split == eval_split}}
        j = int(np.flatnonzero(np.isclose(thresholds, t_best))[0])
        for split, curve in curves.items():
            result["scores"][split] = scores_from_confusion(curve.confusion_at(j), info.classes)
            result["scores"][split]["threshold_chosen_on_this_split"] = not own_bg and split == threshold_split
    write_json(out, result)
    logger.info("background: %s; threshold %.2f on %s (mIoU %.4f); %s mIoU at t: %.4f", criterion, t_best,
                threshold_split, chosen["best_miou"], eval_split, result["scores"][eval_split]["miou"])
    return result


def label_pairs(info: DatasetInfo, mask_shards: Sequence[str], split: str, what: str,
                ids_out: list | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, GT (H, W), label map (H, W))`` for the ids of ``split`` that ``mask_shards`` contain, with a progress
    bar; no such id or a shape mismatch is a :class:`DataError`. ``ids_out`` receives the ids."""
    with ShardedStore(mask_shards, kind="masks") as store:
        ids = [i for i in info.ids(split) if i in store]
        if not ids:
            raise DataError(f"no {what} of split {split!r} in {list(mask_shards)}")
        if ids_out is not None:
            ids_out.extend(ids)
        for image_id in progress(ids, desc=f"eval {what} {split}"):
            pred = store[image_id]
            gt = read_label_png(info.mask_path(image_id), info.n_classes)
            if gt.shape != pred.shape:
                raise DataError(f"mask {info.mask_path(image_id)} is {gt.shape}, {what} {pred.shape}")
            yield image_id, gt, pred


def eval_masks(job: JobSettings, inp: Files, out: Files) -> dict:
    """Score the label maps ``inp.masks`` (``extra.what``: pseudo-masks, predictions, ...) on the split of role
    ``extra.role`` (:func:`mask_scores`), into ``out.json``."""
    setup_job_logging(job.log)
    return mask_scores(job.prepared, inp.masks, job.split(job.extra["role"]), out.json, job.extra["what"])


def mask_scores(prepared: str, mask_shards: Sequence[str], split: str, out: str, what: str = "masks") -> dict:
    """Score the label maps of ``mask_shards`` on the ids of ``split`` that they contain; write JSON scores."""
    logger = get_logger()
    info = DatasetInfo(prepared)
    conf = ConfusionMatrix(info.n_classes)
    ids = []
    for _, gt, pred in label_pairs(info, mask_shards, split, what, ids):
        conf.update(gt, pred)
    scores = conf.scores(info.classes)
    result = {"what": what, "split": split, "n_images": len(ids), "scores": scores}
    write_json(out, result)
    logger.info("%s on %s (%d images): mIoU %.4f", what, split, len(ids), scores["miou"])
    return result
