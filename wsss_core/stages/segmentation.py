"""Stages: train DeepLab-V2 on pseudo-masks (resumable); sharded multi-scale (+flip, +CRF) inference."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import SegmentationDataset
from ..data.io import IGNORE_INDEX, read_image
from ..data.prepare import DatasetInfo
from ..data.transforms import normalize, to_tensor
from ..engine.distributed import launch_ranks
from ..engine.logs import progress, setup_job_logging
from ..engine.trainer import load_final, train_stage
from ..models.deeplab import build_deeplabv2
from ..refine.crf import PRESETS, dense_crf
from ..pipeline import state_dir
from ..store.shards import ShardWriter, shard_ids
from .job import Files, JobSettings


def train_segmentation(job: JobSettings, inp: Files, out: Files) -> None:
    """Train DeepLab-V2 on the pseudo-masks ``inp.masks`` of the ``train`` split into ``out.model``; pixel CE with
    ignore 255; poly LR; resumable."""
    if launch_ranks(train_segmentation, locals()):  # cfg n_procs / ddp_cpu_procs > 1: each rank ran this function
        return
    cfg, seed, split = job.cfg, job.seed, job.split("train")
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    ids = info.ids(split)
    model = build_deeplabv2(info.n_classes, cfg["backbone"], cfg["aspp_rates"], cache_dir=job.weights_dir).to(run.device)
    optimizer = torch.optim.SGD(model.param_groups(cfg["lr"], cfg["weight_decay"]), lr=cfg["lr"],
                                momentum=cfg["momentum"])
    data = SegmentationDataset(info.image_dir, ids, inp.masks, cfg["crop_size"], cfg["scale_range"], seed)
    amp = bool(cfg.get("amp")) and run.device.type == "cuda"

    def step_fn(model, batch, step):
        x, y = batch["image"].to(run.device), batch["mask"].to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, upsample=True)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            valid = y != IGNORE_INDEX
            acc = (logits.argmax(1)[valid] == y[valid]).float().mean() if valid.any() else torch.zeros(())
        return {"loss": loss, "pixel_acc": acc}

    run.logger.info("training DeepLab-V2 (%s) on %d pseudo-masks of %s for %d steps", cfg["backbone"]["arch"],
                    len(ids), split, cfg["max_steps"])
    state = state_dir(out.model)
    train_stage(model, step_fn, data, optimizer, cfg, seed, f"{state}/checkpoints", f"{state}/metrics.jsonl",
                out.model, {"classes": info.classes}, job.config_hash, desc="train deeplab")


@torch.no_grad()
def predict_probs(model, image: np.ndarray, scales: Sequence[float], flip: bool, device: torch.device) -> torch.Tensor:
    """Softmax of the logits averaged over scales (and flips), at full resolution: (C, H, W) float32."""
    h, w = image.shape[:2]
    x0 = to_tensor(normalize(image)).unsqueeze(0).to(device)
    total = 0
    for s in scales:
        x = x0 if s == 1.0 else F.interpolate(x0, size=(max(1, int(h * s)), max(1, int(w * s))), mode="bilinear",
                                              align_corners=True)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        logits = F.interpolate(model(x).float(), size=(h, w), mode="bilinear", align_corners=True)
        total = total + (logits[0] + logits[1].flip(-1) if flip else logits[0])
    return torch.softmax(total / (len(scales) * (2 if flip else 1)), dim=0)


def infer_segmentation(job: JobSettings, inp: Files, out: Files) -> None:
    """Predict label maps for one shard (wildcards ``split``, ``shard``, ``nshards``) with the DeepLab model
    ``inp.model`` into a mask HDF5 shard ``out.masks`` (optional dense CRF)."""
    cfg, split, shard, n_shards = job.cfg, job.wildcards["split"], job.shard, job.n_shards
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    ckpt = load_final(inp.model)
    mcfg = copy.deepcopy(ckpt["meta"]["cfg"])
    mcfg["backbone"]["weights"] = None
    model = build_deeplabv2(len(ckpt["meta"]["classes"]), mcfg["backbone"], mcfg["aspp_rates"])
    model.load_state_dict(ckpt["model"])
    model = model.to(run.device).eval()
    ids = shard_ids(info.ids(split), shard, n_shards)
    crf = PRESETS["deeplab_test"] if cfg.get("infer_crf") else None
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "scales": list(cfg["infer_scales"]), "flip": bool(cfg["infer_flip"]), "crf": repr(crf)}
    with ShardWriter(out.masks, "masks", attrs) as writer:
        for image_id in progress(ids, desc=f"segment {split} {shard + 1}/{n_shards}"):
            image = read_image(info.image_path(image_id))
            probs = predict_probs(model, image, cfg["infer_scales"], cfg["infer_flip"], run.device).cpu().numpy()
            if crf is not None:
                probs = dense_crf(image, probs, crf)
            writer.add_mask(image_id, probs.argmax(0).astype(np.uint8))
    run.logger.info("wrote %d predictions to %s", len(ids), out.masks)


def make_test_submission(job: JobSettings, inp: Files, out: Files) -> None:
    """Stage: the VOC evaluation-server archive ``out.archive`` of the predictions ``inp.preds`` of the ``test``
    split (``extra.comp``: the competition's name in the archive)."""
    from ..report.submission import member_name, write_voc_submission

    logger = setup_job_logging(job.log)
    info = DatasetInfo(job.prepared)
    comp = job.extra.get("comp", "comp6")
    n = write_voc_submission(inp.preds, info.ids(job.split("test")), out.archive, n_classes=info.n_classes, comp=comp)
    logger.info("wrote %s: %d PNGs as %s", out.archive, n, member_name("<id>", comp))
