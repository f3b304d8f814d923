"""Stages of the optional AffinityNet refinement (PSA; ``ppc.md`` §9, ``psa_and_deeplab.md`` part A):
train an affinity network on confident CAM labels, then random-walk the CAMs into pseudo-masks.

Selected per experiment with ``affinity.enabled: true``; the pseudo-masks then come from
:func:`random_walk_masks` instead of the CRF stage.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import _Seeded
from ..data.io import IGNORE_INDEX, read_image
from ..data.prepare import DatasetInfo
from ..data.transforms import color_jitter, normalize, random_crop, to_tensor
from ..engine.context import start_job
from ..engine.logs import progress
from ..engine.trainer import batch_to_device, load_final, train_stage
from ..errors import ConfigError
from ..methods.ppc_ops import ppc_param_groups
from ..refine import affinity as aff
from ..refine.crf import CRFParams, bg_power, crf_refine_cams
from ..store.shards import ShardedStore, ShardWriter, shard_ids
from .refine import resolve_bg_threshold

#: aff_prepare's CRF (ppc.md §9): unary_from_labels(gt_prob 0.7), Gaussian 3/3, bilateral 80/13/10, 10 iterations.
AFF_CRF = CRFParams("labels", 3, 3, 80, 13, 10, 10, 0.7)


def confident_labels(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, la: float, ha: float,
                     crf: CRFParams = AFF_CRF) -> np.ndarray:
    """uint8 (H, W) affinity training labels: CRF at bg = (1 - max)^la (confident fg) and ^ha (confident bg)."""
    lab_la = crf_refine_cams(image, cams, keys, bg_power(cams, la), crf)
    lab_ha = crf_refine_cams(image, cams, keys, bg_power(cams, ha), crf)
    return aff.affinity_label_map(lab_la, lab_ha)


class AffinityDataset(_Seeded, torch.utils.data.Dataset):
    """item: ``{"image": (3, crop, crop), "label": int64 (crop/8, crop/8) with 255 = ignored, "id"}``.

    Labels from :func:`confident_labels` (computed on the fly); augmentation: colour jitter, random crop (image
    pad 0 after normalisation, label pad 255), h-flip; labels reduced to stride 8 by nearest sampling (the
    reference block-averages the two CRF score maps, then takes the argmax).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cam_shards: Sequence[str], cfg: Mapping[str, Any],
                 seed: int = 0):
        self.info, self.ids, self.cam_shards, self.cfg, self.seed = info, list(ids), list(cam_shards), cfg, seed
        self._store = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        if self._store is None:
            self._store = ShardedStore(self.cam_shards)
        rng = self.rng(i)
        image_id = self.ids[i]
        image = read_image(self.info.image_path(image_id))
        keys, cams = self._store[image_id]
        label = confident_labels(image, keys, cams, self.cfg["la"], self.cfg["ha"])
        img = color_jitter(image, rng)
        crop = int(self.cfg["crop_size"])
        img, label = random_crop([normalize(img), label], [0.0, IGNORE_INDEX], crop, rng)
        if rng.random() < 0.5:
            img, label = img[:, ::-1], label[:, ::-1]
        small = cv2.resize(np.ascontiguousarray(label), (crop // 8, crop // 8), interpolation=cv2.INTER_NEAREST)
        return {"image": to_tensor(np.ascontiguousarray(img)), "label": torch.from_numpy(small.astype(np.int64)),
                "id": image_id}


def train_affinity(prepared: str, split: str, cam_shards: Sequence[str], cfg: Mapping[str, Any], out_model: str,
                   ckpt_dir: str, metrics: str, seed: int = 0, device: str = "auto",
                   lock_dir: str = ".wsss/gpu-locks", weights_dir: str = "weights", config_hash: str = "",
                   log: str | None = None, threads: int = 1) -> None:
    """Train AffinityNet on the confident labels of ``split``'s CAMs (resumable; spec A5/A6)."""
    job = start_job(log, threads, seed, device, n_gpus=1, lock_dir=lock_dir)
    info = DatasetInfo(prepared)
    model = aff.build_affinity_net(cfg, cache_dir=weights_dir).to(job.device)
    groups = ppc_param_groups(model, model.new_layers, cfg["lr"], cfg.get("weight_decay", 5e-4),
                              bool(cfg.get("fix_quirk", False)), cfg.get("momentum", 0.9))
    optimizer = torch.optim.SGD(groups, lr=cfg["lr"])
    data = AffinityDataset(info, info.ids(split), cam_shards, cfg, seed)
    radius = int(cfg["radius"])

    def step_fn(model, batch, step):
        batch = batch_to_device(batch, job.device)
        bg_pos, fg_pos, neg = aff.pair_labels(batch["label"], radius)
        a = aff.pair_affinities(model(batch["image"]), radius)
        return aff.affinity_loss(a, bg_pos, fg_pos, neg)

    train_stage(model, step_fn, data, optimizer, cfg, seed, ckpt_dir, metrics, out_model,
                {"method": "affinitynet", "classes": info.classes}, config_hash, desc="train affinity")


@torch.no_grad()
def random_walk_labels(model: aff.AffinityNet, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, bg: float,
                       device: torch.device, radius: int = 5, beta: float = 8.0, logt: int = 6) -> np.ndarray:
    """Spec A7: pad to a multiple of 8, features, dense affinity^beta, T^(2^logt), [bg const, cams] pooled by 8,
    ``cam . T``, bilinear upsampling, argmax, crop. Returns uint8 (H, W) class labels."""
    h, w = image.shape[:2]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    ph, pw = -(-h // 8) * 8, -(-w // 8) * 8
    x = torch.zeros(1, 3, ph, pw)
    x[0, :, :h, :w] = to_tensor(normalize(image))
    feat = model(x.to(device))
    fh, fw = feat.shape[-2:]
    a = aff.pair_affinities(feat, radius)[0]
    trans = aff.transition_matrix(aff.dense_affinity(a, fh, fw, radius), beta, logt)
    scores = np.concatenate([np.full((1, h, w), bg, np.float32), cams.astype(np.float32)])
    s = torch.zeros(1, scores.shape[0], ph, pw, device=device)
    s[0, :, :h, :w] = torch.from_numpy(scores).to(device)
    s = F.avg_pool2d(s, 8)[0]
    rw = aff.random_walk(s, trans)[None]
    rw = F.interpolate(rw, size=(ph, pw), mode="bilinear", align_corners=False)[0, :, :h, :w]
    lut = np.concatenate([[0], np.asarray(keys, np.int64)])
    return lut[rw.argmax(0).cpu().numpy()].astype(np.uint8)


def random_walk_masks(prepared: str, split: str, shard: int, n_shards: int, cam_shards: Sequence[str],
                      model_path: str, cfg: Mapping[str, Any], cam_eval: str, out: str, seed: int = 0,
                      device: str = "auto", lock_dir: str = ".wsss/gpu-locks", config_hash: str = "",
                      log: str | None = None, threads: int = 1) -> None:
    """Pseudo-masks of one shard of ``split`` by random walk with the trained AffinityNet."""
    job = start_job(log, threads, seed, device, n_gpus=1, lock_dir=lock_dir)
    info = DatasetInfo(prepared)
    ckpt = load_final(model_path)
    mcfg = dict(ckpt["meta"]["cfg"])
    mcfg["backbone"] = {**mcfg["backbone"], "weights": None}
    model = aff.build_affinity_net(mcfg)
    model.load_state_dict(ckpt["model"])
    model = model.to(job.device).eval()
    bg, source = resolve_bg_threshold(cfg, cam_eval, "affinity.bg_threshold")
    if bg is None:
        raise ConfigError(f"the AffinityNet random walk needs a constant bg score ({source}); for CAMs with their own "
                          "background map (SIPE, SFC) use the IRN stage (irn.enabled)")
    ids = shard_ids(info.ids(split), shard, n_shards)
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": config_hash,
             "refine": "random_walk", "beta": cfg["beta"], "logt": cfg["logt"], "radius": cfg["radius"],
             "bg_threshold": bg, "bg_threshold_source": source}
    job.logger.info("random walk on %d images: beta %s, logt %s, bg %.2f (%s)", len(ids), cfg["beta"], cfg["logt"],
                    bg, source)
    with ShardedStore(list(cam_shards)) as store, ShardWriter(out, "masks", attrs) as writer:
        for image_id in progress(ids, desc=f"random walk {shard + 1}/{n_shards}"):
            keys, cams = store[image_id]
            image = read_image(info.image_path(image_id))
            writer.add_mask(image_id, random_walk_labels(model, image, keys, cams, bg, job.device,
                                                         int(cfg["radius"]), float(cfg["beta"]), int(cfg["logt"])))
    job.logger.info("wrote %d pseudo-masks to %s", len(ids), out)
