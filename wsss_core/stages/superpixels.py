"""Stages: train a superpixel network (SCN); score superpixel back ends by GT reconstruction."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import SuperpixelDataset
from ..data.io import read_image, read_label_png
from ..data.prepare import DatasetInfo
from ..data.transforms import normalize, to_tensor
from ..engine.logs import progress
from ..engine.trainer import batch_to_device, train_stage
from ..metrics.miou import ConfusionMatrix
from ..pipeline import state_dir
from ..store.atomic import read_json, write_json
from ..superpixel import ops, scn
from ..superpixel.providers import SuperpixelProvider
from .job import Files, JobSettings


def scn_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any],
             n_classes: int) -> dict[str, torch.Tensor]:
    """One SCN training step of ``cfg['recipe']``: ``lab`` (MSA ``train_scn.py``: LAB+XY reconstruction) or
    ``saliency_cam`` (ESC ``train_Q.py``: saliency > ``sal_threshold`` as a 2-class content with the cross-entropy
    term, plus press + diff on the ASAM after ``improved_from`` x ``max_steps`` steps, from superpixel labels of the
    stage-1 CAM). ``n_classes``: foreground classes."""
    q = model(batch["image"])
    if cfg["recipe"] == "lab":
        r = scn.reconstruction_loss(q, batch["lab"], "l2", cfg["pos_weight"])
        return {"loss": r["loss"], "sem_loss": r["sem"], "pos_loss": r["pos"]}
    fg = (batch["saliency"] > cfg["sal_threshold"]).to(q.dtype)
    r = scn.reconstruction_loss(q, torch.cat([1 - fg, fg], 1), "onehot", cfg["pos_weight"])
    with torch.no_grad():
        labels = scn.superpixel_cam_labels(ops.pool(batch["cam"].to(q.dtype), q), cfg["th_bg"], cfg["th_step"],
                                           cfg["th_fg"])
    imp = scn.improved_loss(ops.asam(q), labels, n_classes + 1, cfg["relu_t"])
    on = step > cfg["improved_from"] * cfg["max_steps"]
    loss = r["loss"] + (imp["press"] + imp["diff"] if on else 0)
    return {"loss": loss, "sem_loss": r["sem"], "pos_loss": r["pos"], "press_loss": imp["press"],
            "diff_loss": imp["diff"]}


def train_scn(job: JobSettings, inp: Files, out: Files) -> None:
    """Train superpixel network ``job.experiment`` (a name under ``superpixel_networks``) on the ``train`` split;
    resumable (``state/`` beside ``out.model``). Adam with a constant rate and no weight decay, as both references.
    ``inp.saliency`` / ``inp.cams``: the saliency manifest and the stage-1 CAM shards (recipe ``saliency_cam``)."""
    cfg, seed = job.cfg, job.seed
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    ids = info.ids(job.split("train"))
    model, report = scn.load_scn(cfg.get("weights"), job.weights_dir)
    run.logger.info("SCN init: %s", report["source"])
    model = model.to(run.device)
    n_fg = info.n_classes - 1
    if cfg["recipe"] == "saliency_cam":
        man = read_json(inp.saliency[0])
        data = SuperpixelDataset(info.image_dir, ids, cfg["crop_size"], cfg["resize_long"], "saliency_cam", seed,
                                 n_fg, man["dir"], man.get("ext", ".png"), inp.cams)
    else:
        data = SuperpixelDataset(info.image_dir, ids, cfg["crop_size"], cfg["resize_long"], "lab", seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), betas=(0.9, 0.999), weight_decay=0.0)

    def step_fn(model, batch, step):
        return scn_step(model, batch_to_device(batch, run.device), step, cfg, n_fg)

    run.logger.info("training the %s superpixel network on %s (%d images) for %d steps", cfg["recipe"],
                    job.split("train"), len(ids), cfg["max_steps"])
    state = state_dir(out.model)
    train_stage(model, step_fn, data, optimizer, cfg, seed, f"{state}/checkpoints", f"{state}/metrics.jsonl",
                out.model, {"what": "scn", "network": job.experiment, "recipe": cfg["recipe"]}, job.config_hash,
                desc=f"train scn {job.experiment}", lr_lambda=lambda step: 1.0)


def _padded(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Image normalised and zero-padded, mask padded with 255, both to the next multiples of 16 (bottom, right)."""
    h, w = mask.shape
    hh, ww = -(-h // ops.CELL) * ops.CELL, -(-w // ops.CELL) * ops.CELL
    x = F.pad(to_tensor(normalize(image)), (0, ww - w, 0, hh - h))
    m = np.full((hh, ww), 255, np.uint8)
    m[:h, :w] = mask
    return x[None], m


def eval_superpixels(job: JobSettings, inp: Files, out: Files) -> None:
    """GT-reconstruction mIoU (ESC ``train_Q.py::evaluate``) of the trained SCN ``inp.model``, the soft-SLIC and
    scikit-image SLIC stand-ins, and plain bilinear upsampling (no superpixels), on the first ``eval_images`` images
    of the ``mask_eval`` split: the one-hot GT blurred to ``eval_low`` x ``eval_low`` (12) and back, ``eval_steps``
    walk steps with each back end's ASAM, argmax. Writes ``out.json``."""
    cfg = job.cfg
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    split = job.split("mask_eval")
    ids = info.ids(split)[: int(cfg["eval_images"])]
    net, _ = scn.load_scn({"path": inp.model}, job.weights_dir)
    providers = {"scn": SuperpixelProvider("scn", net.to(run.device)), "soft_slic": SuperpixelProvider("soft_slic"),
                 "skimage_slic": SuperpixelProvider("skimage_slic")}
    steps, low = int(cfg["eval_steps"]), int(cfg.get("eval_low", 12))
    conf = {name: ConfusionMatrix(info.n_classes) for name in [*providers, "bilinear"]}
    for image_id in progress(ids, desc=f"superpixels {split}"):
        x, gt = _padded(read_image(info.image_path(image_id)), read_label_png(info.mask_path(image_id), info.n_classes))
        g = torch.from_numpy(gt.astype(np.int64))[None].to(run.device)
        x = x.to(run.device)
        for name, prov in providers.items():
            q = prov.q(x)
            pred = scn.gt_reconstruction(q, g, info.n_classes, steps, low)
            conf[name].update(gt, pred[0].cpu().numpy())
            if name == "scn":  # no walk: the blurred mask itself (Q only fixes the size)
                base = scn.gt_reconstruction(q, g, info.n_classes, 0, low)
                conf["bilinear"].update(gt, base[0].cpu().numpy())
    result = {"split": split, "images": len(ids), "steps": steps, "low": low, "network": job.experiment,
              "recipe": cfg["recipe"], "config_hash": job.config_hash,
              "backends": {name: c.scores(info.classes) for name, c in conf.items()}}
    write_json(out.json, result)
    run.logger.info("GT reconstruction mIoU on %s (%d images, %d steps): %s", split, len(ids), steps,
                    ", ".join(f"{k} {v['miou']:.4f}" for k, v in result["backends"].items()))


def rw_grid(job: JobSettings, inp: Files, out: Files) -> None:
    """SP-CAM's (n, t) grid (CHENDL-SHEN/ESC ``evaluator.py``: ``refine_list`` x ``th_list``): CAMs of the classifier
    ``inp.model`` after n superpixel random-walk steps for each n of ``cams.rw_grid``, the background-threshold curve
    of each on the ``threshold`` split (where the pair is chosen) and on the ``eval`` split (the references' own
    choice: an oracle there). ``job.extra['eval']``: the eval stage settings (thresholds, mean, search)."""
    from ..metrics.miou import ThresholdCurve
    from .classifier import load_method_model
    from .evaluate import _thresholds

    cfg, ev = job.cfg, job.extra["eval"]
    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    m, model, meta = load_method_model(inp.model, run.device, job.weights_dir)
    if not hasattr(m, "infer_cams_grid"):
        raise ValueError(f"method {meta['method']!r} has no superpixel random walk to sweep (infer_cams_grid)")
    ns = sorted({int(n) for n in cfg["rw_grid"]})
    thresholds = _thresholds(ev)
    strict = ev.get("mean") == "strict"
    splits = list(dict.fromkeys([job.split("threshold"), job.split("eval")]))
    grid: dict[str, dict[int, dict]] = {}
    for split in splits:
        curves = {n: ThresholdCurve(info.n_classes, thresholds) for n in ns}
        for image_id in progress(info.ids(split), desc=f"rw grid {split}"):
            keys = info.labels(image_id)
            gt = read_label_png(info.mask_path(image_id), info.n_classes)
            cams = m.infer_cams_grid(model, read_image(info.image_path(image_id)), keys, cfg["scales"], cfg["flip"],
                                     run.device, ns)
            for n in ns:
                curves[n].update(gt, cams[n], np.asarray(keys, np.int64))
        grid[split] = {n: c.result(info.classes, strict=strict, search=ev.get("search", "grid")) for n, c in
                       curves.items()}
    sel, evs = job.split("threshold"), job.split("eval")

    def best(split: str) -> dict:
        n = max(ns, key=lambda k: grid[split][k]["best_miou"])
        return {"split": split, "n": n, "t": grid[split][n]["best_t"], "miou": grid[split][n]["best_miou"]}

    chosen = best(sel)
    t_index = [round(float(t), 6) for t in thresholds].index(round(float(chosen["t"]), 6))
    metric = "miou_strict" if strict else "miou"
    chosen["eval_miou"] = grid[evs][chosen["n"]][metric][t_index]
    result = {"rw_grid": ns, "thresholds": [float(t) for t in thresholds], "metric": metric,
              "configured_n": int(getattr(model, "rw_steps", 0)), "chosen": chosen, "eval_oracle": best(evs),
              "curves": {split: {str(n): g[metric] for n, g in per.items()} for split, per in grid.items()},
              "n0_vs_best": {"split": sel, "n0": grid[sel][0]["best_miou"] if 0 in ns else None,
                             "best": chosen["miou"], "best_n": chosen["n"]},
              "config_hash": job.config_hash}
    write_json(out.json, result)
    run.logger.info("(n, t) chosen on %s: n=%d t=%s mIoU %.4f (eval %s: %.4f); %s oracle n=%d t=%s mIoU %.4f",
                    sel, chosen["n"], chosen["t"], chosen["miou"], evs, chosen["eval_miou"], evs,
                    result["eval_oracle"]["n"], result["eval_oracle"]["t"], result["eval_oracle"]["miou"])


def superpixel_maps(job: JobSettings, inp: Files, out: Files) -> None:
    """The Q maps of the trained network ``inp.model`` for one shard (wildcards ``split``, ``shard``, ``nshards``) of
    the ``eval`` split, each image padded to a multiple of 16 and Q cropped back to its size: (9, H, W) float16 in the
    HDF5 shard ``out.q`` (attrs: back end, network, recipe). Read by the report's boundary overlay; any stage that
    needs the Q of these images can read them instead of running the network."""
    from ..store.shards import ShardWriter, shard_ids

    run = job.start(n_gpus=1)
    info = DatasetInfo(job.prepared)
    split, shard, n_shards = job.wildcards["split"], job.shard, job.n_shards
    ids = shard_ids(info.ids(split), shard, n_shards)
    net, _ = scn.load_scn({"path": inp.model}, job.weights_dir)
    prov = SuperpixelProvider("scn", net.to(run.device))
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "backend": "scn", "network": job.experiment, "recipe": job.cfg["recipe"], "model": str(inp.model)}
    with ShardWriter(out.q, "q", attrs) as writer:
        for image_id in progress(ids, desc=f"superpixels {split} {shard + 1}/{n_shards}"):
            image = read_image(info.image_path(image_id))
            h, w = image.shape[:2]
            x, _ = _padded(image, np.zeros((h, w), np.uint8))
            writer.add_q(image_id, prov.q(x.to(run.device))[0, :, :h, :w].cpu().numpy())
    run.logger.info("wrote the Q maps of %d images to %s", len(ids), out.q)
