"""Stages of the AffinityNet refinement (PSA, Ahn & Kwak CVPR 2018: jiwoon-ahn/psa ``train_aff.py``,
``infer_aff.py``; as PPC's ``usr922/wseg`` ``aff_prepare`` and MCTformer's ``run_psa.sh`` use it): train an
affinity network on confident CAM labels, then random-walk the CAMs into pseudo-masks.

Selected per experiment with ``refine: affinity``; the pseudo-masks then come from
:func:`random_walk_masks` instead of the CRF stage. Variants: ``affinity.crf`` (default ``psa_aff_label``, the PPC
label-unary CRF over all C classes; MCTformer: ``psa_softmax`` with la 1 / ha 12), ``affinity.label_reduce``
(default ``block_mean``: PSA ``voc12/data.py::VOC12AffDataset`` with ``imutils.AvgPool2d(8)``, as wseg and MCTformer
copy it; ``nearest``: sample the label map) and ``affinity.shrink_radius`` (default true: wseg's smaller walk radius on
a small feature grid; false: PSA/MCTformer). Any method's CAM store works: a store's own bg map (key 0) is dropped,
and the walk then needs a numeric ``affinity.bg_threshold``.
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
from ..data.transforms import color_jitter_fixed_order, normalize, random_crop, to_tensor
from ..engine.distributed import launch_ranks
from ..engine.logs import progress
from ..engine.optim import reference_sgd
from ..engine.trainer import batch_to_device, load_final, train_stage
from ..errors import ConfigError
from ..methods.ppc_ops import ppc_param_groups
from ..refine import affinity as aff
from ..refine.crf import PRESETS, CRFParams, bg_power, crf_cam_probs, crf_params
from ..store.shards import ShardedStore, ShardWriter, shard_ids
from ..pipeline import state_dir
from .job import Files, JobSettings
from .refine import resolve_bg_threshold

#: aff_prepare's CRF (usr922/wseg ``aff_prepare.py``): unary_from_labels(C labels, gt_prob 0.7), Gaussian 3/3, bilateral
#: 80/13/10 (create_pairwise_*), 10 iterations.
AFF_CRF = PRESETS["psa_aff_label"]
#: ``affinity.label_reduce``: how the full-resolution labels reach stride 8 (spec A2 step 4).
LABEL_REDUCE = ("nearest", "block_mean")


def affinity_crf(cfg: Mapping[str, Any]) -> CRFParams:
    """The CRF of the la/ha labels from ``affinity.crf`` {preset, params}; default ``psa_aff_label`` (= AFF_CRF).
    MCTformer (spec A1): ``psa_softmax``."""
    crf = cfg.get("crf") or {}
    return crf_params(crf.get("preset", "psa_aff_label"), **dict(crf.get("params") or {}))


def fg_cams(keys: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A store item without its own background map: keys (K,) and cams (K, H, W) of the foreground classes.

    Stores of SIPE / SFC hold their bg map first as key 0; it is dropped here, because the la/ha labels build the
    bg score from the fg maps ((1 - max)^alpha) and the random walk uses a constant bg score."""
    keys, cams = np.asarray(keys), np.asarray(cams)
    if keys.size and keys[0] == 0:
        return keys[1:], cams[1:]
    return keys, cams


def confident_scores(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, la: float, ha: float,
                     crf: CRFParams = AFF_CRF,
                     n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two CRF score stacks of the affinity labels (spec A1): Q over [bg, cams] with bg = (1 - max cam)^la
    (confident fg) and ^ha (confident bg). An own-bg map (key 0) is dropped first (:func:`fg_cams`). A label CRF
    over all classes (``psa_aff_label``) needs the dataset's class count ``n_classes``.

    Returns the fg keys (K,) and float32 ``q_la``, ``q_ha``, each (K+1, H, W) (the channels [0, *keys])."""
    keys, cams = fg_cams(keys, cams)
    return (keys, crf_cam_probs(image, cams, bg_power(cams, la), crf, keys, n_classes),
            crf_cam_probs(image, cams, bg_power(cams, ha), crf, keys, n_classes))


def confident_labels(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, la: float, ha: float,
                     crf: CRFParams = AFF_CRF, n_classes: int | None = None) -> np.ndarray:
    """uint8 (H, W) affinity training labels at full resolution (class ids, 0 = bg, 255 = ignored):
    :func:`confident_scores` -> :func:`~wsss_core.refine.affinity.score_label_map`. Own-bg maps are dropped."""
    keys, q_la, q_ha = confident_scores(image, keys, cams, la, ha, crf, n_classes)
    return aff.score_label_map(q_la, q_ha, keys)


def reduce_scores(scores: np.ndarray, keys: np.ndarray, block: int = 8) -> np.ndarray:
    """``label_reduce: block_mean``: the stacked la/ha scores (2(K+1), H, W) -> 8 x 8 block means -> uint8
    (H/8, W/8) labels by :func:`~wsss_core.refine.affinity.score_label_map`."""
    s = aff.block_mean(scores, block)
    n = len(keys) + 1
    return aff.score_label_map(s[:n], s[n:], keys)


class AffinityDataset(_Seeded, torch.utils.data.Dataset):
    """item: ``{"image": (3, crop, crop), "label": int64 (crop/8, crop/8) with 255 = ignored, "id"}``.

    Labels from :func:`confident_scores` (computed on the fly with ``cfg["crf"]``; a store's own bg map is
    dropped); augmentation: colour jitter, random crop (image pad 0 after normalisation), h-flip. Reduction to
    stride 8 (``cfg["label_reduce"]``): "block_mean" (default; PSA/PPC/MCTformer ``VOC12AffDataset``) crops the two
    CRF score stacks (pad 0), averages 8 x 8 blocks, then takes the argmax (blocks of padding only: 255);
    "nearest" samples the full-resolution label map (crop pad 255).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cam_shards: Sequence[str], cfg: Mapping[str, Any],
                 seed: int = 0):
        self.info, self.ids, self.cam_shards, self.cfg, self.seed = info, list(ids), list(cam_shards), cfg, seed
        self.crf = affinity_crf(cfg)
        self.n_classes = info.n_classes if self.crf.needs_class_count else None
        self.reduce = cfg.get("label_reduce", "block_mean")
        if self.reduce not in LABEL_REDUCE:
            raise ConfigError(f"affinity.label_reduce must be one of {LABEL_REDUCE}, got {self.reduce!r}")
        self._store = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        if self._store is None:
            self._store = ShardedStore(self.cam_shards)
        rng = self.rng(i)
        image_id = self.ids[i]
        image = read_image(self.info.image_path(image_id))
        keys, q_la, q_ha = confident_scores(image, *self._store[image_id], self.cfg["la"], self.cfg["ha"], self.crf,
                                            self.n_classes)
        img = color_jitter_fixed_order(image, rng)
        crop = int(self.cfg["crop_size"])
        if self.reduce == "nearest":
            target, pad = aff.score_label_map(q_la, q_ha, keys), IGNORE_INDEX      # (H, W) labels
        else:
            target, pad = np.concatenate([q_la, q_ha]).transpose(1, 2, 0), 0.0   # (H, W, 2(K+1)) scores
        img, target = random_crop([normalize(img), target], [0.0, pad], crop, rng)
        if rng.random() < 0.5:
            img, target = img[:, ::-1], target[:, ::-1]
        target = np.ascontiguousarray(target)
        if self.reduce == "nearest":
            small = cv2.resize(target, (crop // 8, crop // 8), interpolation=cv2.INTER_NEAREST)
        else:
            small = reduce_scores(target.transpose(2, 0, 1), keys)
        return {"image": to_tensor(np.ascontiguousarray(img)), "label": torch.from_numpy(small.astype(np.int64)),
                "id": image_id}


def train_affinity(job: JobSettings, inp: Files, out: Files) -> None:
    """Train AffinityNet on the confident labels of the ``train`` split's CAMs ``inp.cams`` into ``out.model``
    (resumable; jiwoon-ahn/psa train_aff.py)."""
    if launch_ranks(train_affinity, locals()):  # cfg n_procs / ddp_cpu_procs > 1: each rank ran this function
        return
    cfg, seed = job.cfg, job.seed
    run = job.start(n_gpus=1)
    radius = int(cfg["radius"])
    side = int(cfg["crop_size"]) // 8
    if side < 2 * radius - 1:  # pair_indices: "from" columns r-1..w-r need w >= 2r - 1
        raise ConfigError(f"affinity.crop_size {cfg['crop_size']} gives a {side}x{side} label grid, too small for "
                          f"affinity.radius {radius} (needs >= {2 * radius - 1} cells, i.e. crop_size >= "
                          f"{8 * (2 * radius - 1)}); raise crop_size or lower radius")
    info = DatasetInfo(job.prepared)
    model = aff.build_affinity_net(cfg, cache_dir=job.weights_dir).to(run.device)
    groups = ppc_param_groups(model, model.new_layers, cfg["lr"], cfg.get("weight_decay", 5e-4))
    optimizer = reference_sgd(groups, cfg, weight_decay=5e-4)
    data = AffinityDataset(info, info.ids(job.split("train")), inp.cams, cfg, seed)

    def step_fn(model, batch, step):
        batch = batch_to_device(batch, run.device)
        bg_pos, fg_pos, neg = aff.pair_labels(batch["label"], radius)
        a = aff.pair_affinities(model(batch["image"]), radius)
        return aff.affinity_loss(a, bg_pos, fg_pos, neg)

    state = state_dir(out.model)
    train_stage(model, step_fn, data, optimizer, cfg, seed, f"{state}/checkpoints", f"{state}/metrics.jsonl",
                out.model, {"method": "affinitynet", "classes": info.classes}, job.config_hash, desc="train affinity")


@torch.no_grad()
def random_walk_labels(model: aff.AffinityNet, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, bg: float,
                       device: torch.device, radius: int = 5, beta: float = 8.0, logt: int = 6,
                       shrink_radius: bool = True) -> np.ndarray:
    """Spec A7: pad to a multiple of 8, features, dense affinity^beta, T^(2^logt), [bg const, cams] pooled by 8,
    ``cam . T``, bilinear upsampling, argmax, crop. Returns uint8 (H, W) class labels.

    The pairs use :func:`~wsss_core.refine.affinity.walk_radius` (``shrink_radius``: wseg's radius (m - 1) // 2 on a
    feature grid whose short side m is < 2 * radius + 1).

    keys (K,), cams (K, H, W) as stored; a store's own bg map (key 0) is dropped (:func:`fg_cams`), the walk's bg
    score is always the constant ``bg``."""
    keys, cams = fg_cams(keys, cams)
    h, w = image.shape[:2]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    ph, pw = -(-h // 8) * 8, -(-w // 8) * 8
    x = torch.zeros(1, 3, ph, pw)
    x[0, :, :h, :w] = to_tensor(normalize(image))
    feat = model(x.to(device))
    fh, fw = feat.shape[-2:]
    radius = aff.walk_radius(fh, fw, radius, shrink_radius)
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


def walk_bg(cfg: Mapping[str, Any], cam_eval: str | None) -> tuple[float, str]:
    """The constant bg score of the walk (``affinity.bg_threshold``) and its source, by
    :func:`~wsss_core.stages.refine.resolve_bg_threshold`. "auto" without an eval_cams threshold (no result, or CAMs
    with their own bg map: SIPE, SFC) is a ConfigError: such stores need a number."""
    bg, source = resolve_bg_threshold(cfg, cam_eval, "affinity.bg_threshold")
    if bg is None or isinstance(bg, tuple):
        raise ConfigError(f"affinity.bg_threshold = {cfg.get('bg_threshold', 'auto')!r} gives no constant bg score "
                          f"for the AffinityNet random walk ({source}). Set affinity.bg_threshold to a number: CAMs "
                          "with their own background map (SIPE, SFC) have no eval_cams threshold, and their bg map is "
                          "dropped for the walk; or use the IRN stage (refine: irn)")
    return float(bg), source


def random_walk_masks(job: JobSettings, inp: Files, out: Files) -> None:
    """Pseudo-masks of one shard of the ``train`` split (``out.masks``) by random walk of the CAMs ``inp.cams`` with
    the trained AffinityNet ``inp.model``."""
    cfg, split, shard, n_shards = job.cfg, job.split("train"), job.shard, job.n_shards
    run = job.start(n_gpus=1)
    bg, source = walk_bg(cfg, inp.cam_eval)
    info = DatasetInfo(job.prepared)
    ckpt = load_final(inp.model)
    mcfg = dict(ckpt["meta"]["cfg"])
    mcfg["backbone"] = {**mcfg["backbone"], "weights": None}
    model = aff.build_affinity_net(mcfg)
    model.load_state_dict(ckpt["model"])
    model = model.to(run.device).eval()
    ids = shard_ids(info.ids(split), shard, n_shards)
    shrink = bool(cfg.get("shrink_radius", True))
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "refine": "random_walk", "beta": cfg["beta"], "logt": cfg["logt"], "radius": cfg["radius"],
             "shrink_radius": shrink, "bg_threshold": bg, "bg_threshold_source": source}
    run.logger.info("random walk on %d images: beta %s, logt %s, bg %.2f (%s)", len(ids), cfg["beta"], cfg["logt"],
                    bg, source)
    with ShardedStore(list(inp.cams)) as store, ShardWriter(out.masks, "masks", attrs) as writer:
        for image_id in progress(ids, desc=f"random walk {shard + 1}/{n_shards}"):
            keys, cams = store[image_id]
            image = read_image(info.image_path(image_id))
            writer.add_mask(image_id, random_walk_labels(model, image, keys, cams, bg, run.device,
                                                         int(cfg["radius"]), float(cfg["beta"]), int(cfg["logt"]),
                                                         shrink))
    run.logger.info("wrote %d pseudo-masks to %s", len(ids), out.masks)
