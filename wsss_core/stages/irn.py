"""Stages of the IRN refinement (Ahn et al. CVPR 2019, jiwoon-ahn/irn ``step/*.py``) as SIPE / SFC use it:
CAMs -> confident-region labels (cam2ir,
CPU, two CRFs), train the IRN boundary/displacement network on them, random-walk the CAMs along the predicted
boundaries into pseudo-masks, and score the confident-region labels.

CAM stores with their own background map (keys start with 0: SIPE, SFC) are used as they are; for other stores
(plain CAM, PPC) a constant background plane is prepended, its value from ``bg_threshold`` ("auto" = the
threshold chosen by eval_cams). Stores with a second stack (``aux``, SFC's PCM classifier CAM) are combined as
``cams_weight * cams + aux_weight * aux``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.datasets import SegmentationDataset
from ..data.io import IGNORE_INDEX, read_image
from ..data.prepare import DatasetInfo
from ..data.transforms import crop_with_box, normalize, to_tensor
from ..engine.distributed import launch_ranks
from ..engine.logs import get_logger, progress, setup_job_logging
from ..engine.optim import poly_sgd_param_groups, reference_sgd
from ..engine.trainer import load_final, train_stage
from ..errors import ConfigError, DataError
from ..metrics import ConfusionMatrix
from ..refine import irn
from ..refine.crf import crf_params
from ..store.atomic import write_json
from ..store.shards import ShardedStore, ShardWriter, shard_ids
from ..pipeline import state_dir
from .evaluate import label_pairs
from .job import Files, JobSettings
from .refine import map_images, resolve_bg_threshold

# --------------------------------------------------------------------------------------------- shared helpers


def resolve_bg(cfg: Mapping[str, Any], cam_eval: str | None, key: str = "irn.bg_threshold") -> tuple[float | None, str]:
    """The constant bg score for CAM stores without a background map (``irn.bg_threshold``; None when not needed or
    not available), by :func:`wsss_core.stages.refine.resolve_bg_threshold`."""
    return resolve_bg_threshold(cfg, cam_eval, key)


def _image_of(info: DatasetInfo, image_id: str, maps: np.ndarray) -> np.ndarray:
    """The uint8 image of ``image_id``; a size different from its (K, H, W) maps is a DataError."""
    image = read_image(info.image_path(image_id))
    if image.shape[:2] != maps.shape[1:]:
        raise DataError(f"{image_id}: image {image.shape[:2]} and CAMs {maps.shape[1:]} differ in size")
    return image


def combined_maps(store: ShardedStore, image_id: str, weights: Mapping[str, float],
                  bg: float | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(keys, X, added_bg)`` of one image: ``X = w_cams * cams + w_aux * aux`` (K, H, W), with a constant bg
    plane of value ``bg`` prepended (and key 0) when the store has no background map."""
    keys, cams = store[image_id]
    wc, wa = float(weights.get("cams", 1.0)), float(weights.get("aux", 0.0))
    x = cams * wc if wc != 1.0 else cams
    if wa != 0.0:
        aux = store.aux(image_id)
        if aux is None:
            raise DataError(f"{image_id}: the map combination gives the aux stack the weight {wa}, but the CAM shards "
                            f"{[str(p) for p in store.paths]} hold no 'aux' maps (only SFC writes them); set the "
                            "aux weight to 0 for this method")
        if aux.shape != cams.shape:
            raise DataError(f"{image_id}: aux maps {aux.shape} differ from the cams {cams.shape}")
        x = x + wa * aux
    if keys.size and keys[0] == 0:
        return keys, x, False
    if bg is None:
        raise DataError(f"{image_id}: the CAMs have no background map and no bg threshold is available "
                        "(bg_threshold: auto needs the eval_cams result); set bg_threshold to a number")
    x = np.concatenate([np.full((1, *x.shape[1:]), bg, np.float32), x.astype(np.float32, copy=False)])
    return np.concatenate([[0], keys]).astype(np.int64), x, True


# --------------------------------------------------------------------------------------------- cam2ir

_WORKER: dict[str, Any] = {}


def _init_worker(cam_shards, prepared, params, weights, bg, bg_scale) -> None:
    _WORKER.update(store=ShardedStore(cam_shards), info=DatasetInfo(prepared), params=params, weights=weights, bg=bg,
                   bg_scale=bg_scale)


def _ir_label_one(image_id: str) -> tuple[str, np.ndarray, bool]:
    w = _WORKER
    keys, x, added = combined_maps(w["store"], image_id, w["weights"], w["bg"])
    image = _image_of(w["info"], image_id, x)
    return image_id, irn.cam_to_ir_label(image, x, keys, w["params"], w["bg_scale"]), added


def cam_to_ir_label(job: JobSettings, inp: Files, out: Files) -> None:
    """Confident-region labels (uint8 mask shard ``out.masks``, values 0..C-1 and 255) of one shard of the ``train``
    split from the CAMs ``inp.cams`` (jiwoon-ahn/irn step/cam_to_ir_label.py).

    cfg (stage ``irn``): ``cam_combine`` {cams, aux}, ``bg_scale``, ``bg_threshold``, ``crf`` {preset, params},
    ``n_workers``."""
    cfg, split, shard, n_shards = job.cfg, job.split("train"), job.shard, job.n_shards
    logger = setup_job_logging(job.log)
    info = DatasetInfo(job.prepared)
    crf = dict(cfg.get("crf") or {})
    # SIPE/IRN crf_inference_label: the label unary over bg + the present classes (cam_to_ir_label's compact keys)
    params = crf_params(crf.get("preset", "seam_label"), **{"label_unary": "present", **dict(crf.get("params") or {})})
    if params.needs_class_count:
        raise ConfigError("irn.crf.params.label_unary must be 'present': cam_to_ir_label runs the CRF over bg + the "
                          "image's classes (SIPE/IRN crf_inference_label)")
    weights = dict(cfg.get("cam_combine") or {"cams": 1.0, "aux": 0.0})
    bg, source = resolve_bg(cfg, inp.cam_eval)
    bg_scale = float(cfg.get("bg_scale", 0.5))
    ids = shard_ids(info.ids(split), shard, n_shards)
    logger.info("cam2ir on %d images: maps %s, bg x %.2f, CRF %s; constant bg for CAMs without a bg map: %s (%s)",
                len(ids), weights, bg_scale, params, bg, source)
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash, "crf": repr(params),
             "cam_combine": weights, "bg_scale": bg_scale, "bg_threshold_source": source, "refine": "cam2ir"}
    if bg is not None:
        attrs["bg_threshold"] = bg
    n_workers = max(1, min(int(cfg.get("n_workers", 1)), job.threads))
    n_added = 0
    with contextlib.ExitStack() as stack:
        results = stack.enter_context(map_images(_ir_label_one, ids, n_workers, _init_worker,
                                                 (list(inp.cams), job.prepared, params, weights, bg, bg_scale),
                                                 lambda: _WORKER["store"].close()))
        writer = stack.enter_context(ShardWriter(out.masks, "masks", attrs))
        for image_id, mask, added in progress(results, total=len(ids), desc=f"cam2ir {shard + 1}/{n_shards}"):
            writer.add_mask(image_id, mask)
            n_added += added
    if n_added:
        logger.info("%d of %d images had no background map: constant bg %s (%s)", n_added, len(ids), bg, source)
    logger.info("wrote %d confident-region labels to %s", len(ids), out.masks)


# --------------------------------------------------------------------------------------------- train

@torch.no_grad()
def compute_mean_shift(model: irn.IRNet, info: DatasetInfo, ids: Sequence[str], crop: int, batch_size: int,
                       device: torch.device) -> torch.Tensor:
    """The post-training step of jiwoon-ahn/irn ``step/train_irn.py`` (``model.mean_shift``): the mean displacement
    (2,) over top-left ``crop`` crops (zero pad) of ``ids`` in eval mode,
    averaged over space and batch, then over batches (incomplete last batch dropped unless it is the only one).
    Stored in ``model.mean_shift.running_mean``; returned."""
    ids = list(ids)
    if not ids:
        raise DataError("no images for the IRN mean shift")
    model.eval()
    model.mean_shift.running_mean.zero_()
    n_full = len(ids) // batch_size
    batches = [ids[i * batch_size:(i + 1) * batch_size] for i in range(n_full)] or [ids]
    means = []
    for b in progress(batches, desc="irn mean shift"):
        x = torch.stack([to_tensor(crop_with_box(normalize(read_image(info.image_path(i))), (0, 0, 0, 0), crop, 0.0))
                         for i in b])  # top-left crop, zero pad
        means.append(model(x.to(device))[1].mean((0, 2, 3)))
    ms = torch.stack(means).mean(0)
    model.mean_shift.running_mean.copy_(ms)
    return ms


def _sgd_groups(model: irn.IRNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Edge layers at lr, displacement layers at lr * disp_lr_mult (PolyOptimizerSGD, momentum quirk)."""
    return poly_sgd_param_groups([("edge", model.edge_layers.parameters(), 1.0),
                                  ("disp", model.disp_layers.parameters(), float(cfg.get("disp_lr_mult", 10)))], cfg)


def check_pair_grid(crop_size: int, radius: float) -> None:
    """The crop's OS4 grid must hold source pixels for the radius (irn ``misc/indexing.py::PathIndex``: columns
    [r_f, w - r_f), r_f = ceil(R) - 1);
    otherwise training would have no pairs and nothing to learn."""
    side = -(-int(crop_size) // 4)
    rf = int(math.ceil(radius)) - 1
    if side - 2 * rf <= 0:
        raise ConfigError(f"irn.crop_size {crop_size} gives a {side}x{side} feature grid, too small for irn.radius "
                          f"{radius:g} (needs more than {2 * rf} cells, i.e. crop_size > {8 * rf}); raise crop_size "
                          "or lower radius")


def train_irn(job: JobSettings, inp: Files, out: Files) -> None:
    """Train IRN on the confident-region labels ``inp.ir_labels`` of the ``train`` split (resumable; jiwoon-ahn/irn
    step/train_irn.py), then store the mean shift computed on the ``mask_eval`` split in the final weights
    ``out.model``. ``inp.classifier``: the trained classifier (a one-element list) when
    ``irn.init_from_classifier``."""
    if launch_ranks(train_irn, locals()):  # cfg n_procs / ddp_cpu_procs > 1: each rank ran this function
        return
    cfg, seed, split = job.cfg, job.seed, job.split("train")
    classifier_model = (inp.get("classifier") or [None])[0]
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    init_clf = bool(cfg.get("init_from_classifier"))
    model = irn.build_irnet(cfg["backbone"], cache_dir=job.weights_dir, weights=None if init_clf else "cfg")
    if init_clf:
        if not classifier_model:
            raise ConfigError("irn.init_from_classifier is true but no classifier model was given")
        state = load_final(classifier_model)["model"]
        try:
            prefix = irn.copy_backbone_from(model.backbone, state)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"irn.init_from_classifier: cannot copy the backbone of {classifier_model}: {exc}. "
                              "irn.backbone (arch, layers, width_per_group) must match the classifier's "
                              "backbone, or set irn.init_from_classifier: false") from exc
        run.logger.info("backbone initialised from the classifier %s (keys %s*)", classifier_model, prefix)
    model = model.to(run.device)
    groups = _sgd_groups(model, cfg)
    optimizer = reference_sgd(groups, cfg)
    ids = info.ids(split)
    data = SegmentationDataset(info.image_dir, ids, list(inp.ir_labels), cfg["crop_size"], cfg["scale_range"], seed)
    radius = float(cfg.get("radius", 10))
    check_pair_grid(int(cfg["crop_size"]), radius)
    n_classes = info.n_classes

    def step_fn(model, batch, step):
        x = batch["image"].to(run.device, non_blocking=True)
        y = batch["mask"].to(run.device, non_blocking=True)
        edge, disp = model(x)
        labels = irn.downsample_labels(y, tuple(edge.shape[-2:]))
        bg_pos, fg_pos, neg = irn.irn_pair_labels(labels, radius, n_classes)
        out = irn.irn_loss(edge, disp, bg_pos, fg_pos, neg, radius)
        return {**out, "n_bg_pos": bg_pos.sum(), "n_fg_pos": fg_pos.sum(), "n_neg": neg.sum()}

    ms_split = job.split("mask_eval")

    def before_save(model):
        ms = compute_mean_shift(model, info, info.ids(ms_split), int(cfg["crop_size"]), int(cfg["batch_size"]),
                                run.device)
        run.logger.info("mean shift on %s: %s", ms_split, ms.tolist())
        return {"mean_shift": ms.tolist(), "mean_shift_split": ms_split}

    run.logger.info("training IRN (%s, init %s) on %d confident-region labels of %s for %d steps, radius %g, "
                    "momentum %g", cfg["backbone"].get("arch"), "classifier" if init_clf else "backbone.weights",
                    len(ids), split, cfg["max_steps"], radius, groups[0]["momentum"])
    state = state_dir(out.model)
    train_stage(model, step_fn, data, optimizer, cfg, seed, f"{state}/checkpoints", f"{state}/metrics.jsonl",
                out.model, {"method": "irn", "classes": info.classes}, job.config_hash, desc="train irn",
                before_save=before_save)


def load_irnet(path: str, map_location: str | torch.device = "cpu") -> tuple[irn.IRNet, dict]:
    """The trained IRNet (eval mode, on CPU) and its meta from a :func:`train_irn` file."""
    ckpt = load_final(path, map_location=map_location)
    meta = dict(ckpt["meta"])
    model = irn.build_irnet(meta["cfg"]["backbone"], weights=None)
    model.load_state_dict(ckpt["model"])
    return model.eval(), meta


# --------------------------------------------------------------------------------------------- random walk

def make_sem_seg_labels(job: JobSettings, inp: Files, out: Files) -> None:
    """Pseudo-masks (uint8 shard ``out.masks``, values 0..C-1) of one shard of the ``train`` split by the IRN random
    walk of the CAMs ``inp.cams`` with the boundary network ``inp.model`` (jiwoon-ahn/irn
    step/make_sem_seg_labels.py).

    cfg (stage ``irn``): ``rw`` {radius, beta, exp_times, power, combine {cams, aux}, two_pass, bg_const},
    ``bg_threshold`` (stores without a bg map)."""
    cfg, split, shard, n_shards = job.cfg, job.split("train"), job.shard, job.n_shards
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    model, meta = load_irnet(inp.model)
    model = model.to(run.device)
    pad_to = int(meta["cfg"]["crop_size"])
    rw = dict(cfg["rw"])
    weights = dict(rw.get("combine") or {"cams": 1.0, "aux": 0.0})
    bg, source = resolve_bg(cfg, inp.cam_eval)
    ids = shard_ids(info.ids(split), shard, n_shards)
    settings = {k: rw[k] for k in ("radius", "beta", "exp_times", "power", "two_pass", "bg_const") if k in rw}
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash, "refine": "irn_rw",
             "rw": settings, "combine": weights, "bg_threshold_source": source, "irn_model": str(inp.model)}
    if bg is not None:
        attrs["bg_threshold"] = bg
    run.logger.info("IRN random walk on %d images: %s, maps %s; constant bg for CAMs without a bg map: %s (%s)",
                    len(ids), settings, weights, bg, source)
    seconds, n_added = [], 0
    with ShardedStore(list(inp.cams)) as store, ShardWriter(out.masks, "masks", attrs) as writer:
        for image_id in progress(ids, desc=f"irn rw {shard + 1}/{n_shards}"):
            t0 = time.time()
            keys, x, added = combined_maps(store, image_id, weights, bg)
            n_added += added
            image = _image_of(info, image_id, x)
            edge = irn.edge_inference(model, to_tensor(normalize(image)).to(run.device), pad_to)
            mask = irn.sem_seg_labels(x, keys, edge, radius=int(rw.get("radius", 5)), beta=float(rw.get("beta", 10)),
                                      exp_times=int(rw.get("exp_times", 8)), power=float(rw.get("power", 1.5)),
                                      two_pass=bool(rw.get("two_pass", False)),
                                      bg_const=float(rw.get("bg_const", 0.25)))
            writer.add_mask(image_id, mask)
            seconds.append(time.time() - t0)
    if n_added:
        run.logger.info("%d of %d images had no background map: constant bg %s (%s)", n_added, len(ids), bg, source)
    if seconds:
        s = np.asarray(seconds)
        run.logger.info("random walk: %.3f s/image mean, %.3f median, %.3f max over %d images", s.mean(),
                        np.median(s), s.max(), s.size)
    run.logger.info("wrote %d pseudo-masks to %s", len(ids), out.masks)


# --------------------------------------------------------------------------------------------- eval

def eval_ir_labels(job: JobSettings, inp: Files, out: Files) -> dict:
    """Score the confident-region labels ``inp.masks`` on the split of role ``extra.role`` (:func:`ir_label_scores`)
    into ``out.json``."""
    setup_job_logging(job.log)
    return ir_label_scores(job.prepared, inp.masks, job.split(job.extra["role"]), out.json)


def ir_label_scores(prepared: str, ir_label_shards: Sequence[str], split: str, out: str) -> dict:
    """Score confident-region labels on the ids of ``split`` they contain.

    JSON: ``scores`` (mIoU etc. on the labelled pixels only: prediction != 255), ``labelled_fraction`` (labelled
    share of the valid GT pixels), ``scores_unlabelled_as_bg`` (255 counted as background, SFC's eval_sem_seg)."""
    logger = get_logger()
    info = DatasetInfo(prepared)
    conf, conf_bg = ConfusionMatrix(info.n_classes), ConfusionMatrix(info.n_classes)
    n_valid = n_labelled = 0
    ids: list[str] = []
    for _, gt, pred in label_pairs(info, ir_label_shards, split, "ir_labels", ids):
        labelled = pred != IGNORE_INDEX
        valid = gt != IGNORE_INDEX
        n_valid += int(valid.sum())
        n_labelled += int((valid & labelled).sum())
        conf.update(np.where(labelled, gt, IGNORE_INDEX), pred)
        conf_bg.update(gt, np.where(labelled, pred, 0))
    scores = conf.scores(info.classes)
    frac = n_labelled / n_valid if n_valid else float("nan")
    result = {"what": "ir_labels", "split": split, "n_images": len(ids), "labelled_fraction": frac,
              "miou_labelled": scores["miou"], "pixel_acc_labelled": scores["pixel_acc"], "scores": scores,
              "scores_unlabelled_as_bg": conf_bg.scores(info.classes)}
    write_json(out, result)
    logger.info("ir_labels on %s (%d images): %.1f%% of the pixels labelled, mIoU there %.4f (pixel acc %.4f); "
                "with 255 -> bg mIoU %.4f", split, len(ids), 100 * frac, scores["miou"], scores["pixel_acc"],
                result["scores_unlabelled_as_bg"]["miou"])
    return result
