"""Stages: train a method's classification network; infer sharded multi-scale CAMs."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from ..config import deep_merge
from ..data.datasets import ClassificationDataset, TimmClassificationDataset, ViewsDataset
from ..data.io import read_image
from ..data.prepare import DatasetInfo
from ..engine.distributed import launch_ranks
from ..engine.logs import progress
from ..engine.trainer import batch_to_device, load_final, train_stage
from ..errors import ConfigError
from ..methods import get_method
from ..methods.base import make_lr_lambda, make_optimizer
from ..methods.inference import compiled_cam_fn, frozen_cam_fn, method_cams
from ..store.atomic import read_json
from ..pipeline import state_dir
from ..store.shards import ShardWriter, shard_ids
from .job import Files, JobSettings


def train_classifier(job: JobSettings, inp: Files, out: Files) -> None:
    """Train ``job.method``'s network on the ``train`` split with image-level labels; resumable (``state/`` beside
    ``out.model``); final weights written atomically. ``inp.saliency``: the saliency stage's manifest (a list,
    empty unless the method's ``data_needs`` asks for saliency)."""
    if launch_ranks(train_classifier, locals()):  # cfg n_procs / ddp_cpu_procs > 1: each rank ran this function
        return
    cfg, method, seed, split = job.cfg, job.method, job.seed, job.split("train")
    run = job.start(n_gpus=1)
    state = state_dir(out.model)
    info = DatasetInfo(job.prepared)
    ids = info.ids(split)
    m = get_method(method)
    sp = cfg.get("superpixels") or {}
    if inp.get("scn"):  # the trained superpixel network this classifier takes its Q maps from
        cfg = deep_merge(cfg, {"superpixels": {"weights": {"path": inp.scn[0]}}})
    elif sp.get("backend") == "scn" and not (sp.get("scn") == "file" and sp.get("weights")):
        raise ConfigError("classifier.superpixels.backend is scn but the job got no superpixel network: set "
                          "superpixels.network to a name under superpixel_networks (scn: trained), or scn: file "
                          "with superpixels.weights: {path: ...}")
    model = m.build_model(cfg, info.n_classes - 1, cache_dir=job.weights_dir).to(run.device)
    optimizer = make_optimizer(m, model, cfg)
    data = training_data(m, cfg, info, ids, seed, (inp.get("saliency") or [None])[0])
    if hasattr(m, "setup"):
        m.setup(model, info.multi_hot(ids), cfg)
    amp = bool(cfg.get("amp")) and run.device.type == "cuda"

    def step_fn(model, batch, step):
        batch = batch_to_device(batch, run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp):
            return m.training_step(model, batch, step, cfg)

    after_step = (lambda model, step: m.after_step(model, step, cfg)) if hasattr(m, "after_step") else None
    run.logger.info("training %s on %s (%d images, %d classes) for %d steps", method, split, len(ids),
                    info.n_classes - 1, cfg["max_steps"])
    train_stage(model, step_fn, data, optimizer, cfg, seed, f"{state}/checkpoints", f"{state}/metrics.jsonl",
                out.model, {"method": method, "classes": info.classes}, job.config_hash, desc=f"train {method}",
                after_step=after_step, lr_lambda=make_lr_lambda(m, cfg, len(data) // int(cfg["batch_size"])))


def training_data(m, cfg: Mapping[str, Any], info: DatasetInfo, ids: list[str], seed: int,
                  saliency: str | None = None) -> torch.utils.data.Dataset:
    """The training dataset a method asks for (``data_needs``): classic crops, or weak/saliency/strong views."""
    needs = m.data_needs(cfg) if hasattr(m, "data_needs") else {}
    labels = info.multi_hot(ids)
    if needs.get("timm"):
        return TimmClassificationDataset(info.image_dir, ids, labels, cfg["crop_size"], seed, **needs["timm"])
    if not needs.get("views"):
        return ClassificationDataset(info.image_dir, ids, labels, cfg["crop_size"], cfg["resize_long"], seed,
                                     jitter=needs.get("jitter", True), valid=bool(needs.get("valid")))
    sal_dir, sal_ext = None, ".png"
    if needs.get("saliency"):
        if not saliency:
            raise ConfigError("this method trains with saliency maps: set classifier.saliency: true for the "
                              "experiment so the saliency stage runs")
        man = read_json(saliency)
        sal_dir, sal_ext = man["dir"], man.get("ext", ".png")
    strong_cfg = m.strong_view_settings(cfg) if needs.get("strong") else None
    return ViewsDataset(info.image_dir, ids, labels, cfg["crop_size"], cfg["resize_long"], seed,
                        saliency_dir=sal_dir, saliency_ext=sal_ext, strong=bool(needs.get("strong")),
                        strong_cfg=strong_cfg, valid=bool(needs.get("valid")))


def load_method_model(path: str, device: torch.device, weights_dir: str = "weights"):
    """Rebuild a trained method model from its final weights file; returns (method module, model, meta)."""
    ckpt = load_final(path)
    meta = ckpt["meta"]
    m = get_method(meta["method"])
    cfg = copy.deepcopy(meta["cfg"])
    cfg["backbone"]["weights"] = None  # the trained weights below replace any pretrained init
    model = m.build_model(cfg, len(meta["classes"]) - 1, cache_dir=weights_dir)
    model.load_state_dict(ckpt["model"])
    return m, model.to(device).eval(), meta


def infer_cams(job: JobSettings, inp: Files, out: Files) -> None:
    """Multi-scale + flip CAMs of one shard (wildcards ``split``, ``shard``, ``nshards``) for each image's present
    classes, from the classifier ``inp.model``, into one HDF5 shard ``out.cams``."""
    cfg, split, shard, n_shards = job.cfg, job.wildcards["split"], job.shard, job.n_shards
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    ids = shard_ids(info.ids(split), shard, n_shards)
    m, model, meta = load_method_model(inp.model, run.device)
    amp = bool(cfg.get("amp", False))
    # CPU: the method's cam_forward frozen (TorchScript) or compiled once per job (bench/bench_cam_inference.py);
    # CUDA, optimize false or a failed check: the eager function on channels-last views
    cam_fn = None
    optimize = cfg.get("optimize", "freeze")  # freeze (true) | compile | false
    if not hasattr(m, "infer_cams"):
        if run.device.type == "cpu" and optimize:
            cam_fn, how = (compiled_cam_fn if optimize == "compile" else frozen_cam_fn)(model, m.cam_forward)
            run.logger.info("CAM inference: %s", how)
            if how.startswith("eager"):
                cam_fn = None
        if cam_fn is None:
            model = model.to(memory_format=torch.channels_last)  # multiscale_cams feeds NHWC views
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "scales": list(cfg["scales"]), "flip": bool(cfg["flip"]), "model": str(inp.model),
             "method": meta["method"], "classes": info.classes}
    with ShardWriter(out.cams, "cams", attrs) as writer:
        for image_id in progress(ids, desc=f"cams {split} {shard + 1}/{n_shards}"):
            keys = info.labels(image_id)
            image = read_image(info.image_path(image_id))
            keys, cams, aux = method_cams(m, model, image, keys, cfg["scales"], cfg["flip"], run.device, amp=amp,
                                          cam_fn=cam_fn)
            writer.add_cams(image_id, keys, cams, aux)
    run.logger.info("wrote %d CAMs to %s", len(ids), out.cams)
