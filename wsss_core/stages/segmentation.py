"""Stages: train DeepLab-V2 on pseudo-masks (resumable); sharded multi-scale (+flip, +CRF) inference."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import SegmentationDataset
from ..data.io import IGNORE_INDEX, read_image
from ..data.prepare import DatasetInfo
from ..data.transforms import normalize, to_tensor
from ..engine.context import start_job
from ..engine.distributed import launch_ranks
from ..engine.logs import progress, setup_job_logging
from ..engine.trainer import load_final, train_stage
from ..models.deeplab import build_deeplabv2
from ..refine.crf import PRESETS, dense_crf
from ..store.shards import ShardWriter, shard_ids


def train_segmentation(prepared: str, split: str, mask_shards: Sequence[str], cfg: Mapping[str, Any], out_model: str,
                       ckpt_dir: str, metrics: str, seed: int = 0, device: str = "auto",
                       lock_dir: str = ".wsss/gpu-locks", weights_dir: str = "weights", config_hash: str = "",
                       log: str | None = None, threads: int = 1) -> None:
    """Train DeepLab-V2 on the pseudo-masks of ``split``; pixel CE with ignore 255; poly LR; resumable."""
    if launch_ranks(train_segmentation, locals()):  # cfg n_procs / ddp_cpu_procs > 1: each rank ran this function
        return
    job = start_job(log, threads, seed, device, n_gpus=1, lock_dir=lock_dir)
    info = DatasetInfo(prepared)
    ids = info.ids(split)
    model = build_deeplabv2(info.n_classes, cfg["backbone"], cfg["aspp_rates"], cache_dir=weights_dir).to(job.device)
    optimizer = torch.optim.SGD(model.param_groups(cfg["lr"], cfg["weight_decay"]), lr=cfg["lr"],
                                momentum=cfg["momentum"])
    data = SegmentationDataset(info.image_dir, ids, mask_shards, cfg["crop_size"], cfg["scale_range"], seed)
    amp = bool(cfg.get("amp")) and job.device.type == "cuda"

    def step_fn(model, batch, step):
        x, y = batch["image"].to(job.device), batch["mask"].to(job.device)
        with torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, upsample=True)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            valid = y != IGNORE_INDEX
            acc = (logits.argmax(1)[valid] == y[valid]).float().mean() if valid.any() else torch.zeros(())
        return {"loss": loss, "pixel_acc": acc}

    job.logger.info("training DeepLab-V2 (%s) on %d pseudo-masks of %s for %d steps", cfg["backbone"]["arch"],
                    len(ids), split, cfg["max_steps"])
    train_stage(model, step_fn, data, optimizer, cfg, seed, ckpt_dir, metrics, out_model,
                {"classes": info.classes}, config_hash, desc="train deeplab")


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


def infer_segmentation(prepared: str, split: str, shard: int, n_shards: int, model_path: str,
                       cfg: Mapping[str, Any], out: str, seed: int = 0, device: str = "auto",
                       lock_dir: str = ".wsss/gpu-locks", config_hash: str = "", log: str | None = None,
                       threads: int = 1) -> None:
    """Predict label maps for one shard of ``split`` into a mask HDF5 shard (optional dense CRF)."""
    job = start_job(log, threads, seed, device, n_gpus=1, lock_dir=lock_dir)
    info = DatasetInfo(prepared)
    ckpt = load_final(model_path)
    mcfg = copy.deepcopy(ckpt["meta"]["cfg"])
    mcfg["backbone"]["weights"] = None
    model = build_deeplabv2(len(ckpt["meta"]["classes"]), mcfg["backbone"], mcfg["aspp_rates"])
    model.load_state_dict(ckpt["model"])
    model = model.to(job.device).eval()
    ids = shard_ids(info.ids(split), shard, n_shards)
    crf = PRESETS["deeplab_test"] if cfg.get("infer_crf") else None
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": config_hash,
             "scales": list(cfg["infer_scales"]), "flip": bool(cfg["infer_flip"]), "crf": repr(crf)}
    with ShardWriter(out, "masks", attrs) as writer:
        for image_id in progress(ids, desc=f"segment {split} {shard + 1}/{n_shards}"):
            image = read_image(info.image_path(image_id))
            probs = predict_probs(model, image, cfg["infer_scales"], cfg["infer_flip"], job.device).cpu().numpy()
            if crf is not None:
                probs = dense_crf(image, probs, crf)
            writer.add_mask(image_id, probs.argmax(0).astype(np.uint8))
    job.logger.info("wrote %d predictions to %s", len(ids), out)


def make_test_submission(prepared: str, split: str, pred_shards: Sequence[str], out: str, comp: str = "comp6",
                         log: str | None = None) -> None:
    """Stage: the VOC evaluation-server archive of the segmentation predictions of ``split`` (the test set)."""
    from ..report.submission import member_name, write_voc_submission

    logger = setup_job_logging(log)
    info = DatasetInfo(prepared)
    n = write_voc_submission(pred_shards, info.ids(split), out, n_classes=info.n_classes, comp=comp)
    logger.info("wrote %s: %d PNGs as %s", out, n, member_name("<id>", comp))
