"""Item 6, training step: images/s of one classifier training step (forward, loss, backward, optimizer step) of the
ResNet-50 CAM network (:mod:`wsss_core.methods.cam`) and the ResNet-38 PPC network (:mod:`wsss_core.methods.ppc`, EPS
variant with saliency, two views), on the CPU; and the data-loading throughput of the stage's own dataset and loader
(:class:`~wsss_core.data.datasets.ClassificationDataset` / :class:`~wsss_core.data.datasets.ViewsDataset` through
:func:`wsss_core.engine.trainer.batch_stream`: each JPEG decoded once per sample, ``num_workers`` processes, pinned
memory when training on CUDA) on VOC-sized JPEGs rendered from real VOC masks.

- goal on the CPU: data loading is not the bottleneck: the loader delivers more images/s (with the stage's workers)
  than the step consumes; the ratio is loader images/s / step images/s (> 1 met).
- GPU (bf16 autocast + channels-last vs fp32): run only when CUDA is available, else reported "not run: no GPU".
- The step sizes are CPU-sized (``--crop``, ``--batch``; VOC trains at crop 512 / batch 16 on a GPU) and reported.
- guard: every loss is finite and the parameters change.

    python bench/bench_train_step.py [--crop 192] [--batch 2] [--steps 2] [--images 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import load_voc_masks, render_image, result, write_result

from wsss_core.data.datasets import ClassificationDataset, ViewsDataset
from wsss_core.engine.trainer import batch_stream, batch_to_device
from wsss_core.methods import cam as cam_method
from wsss_core.methods import ppc as ppc_method
from wsss_core.methods.base import make_optimizer

CAM_CFG = {"backbone": {"arch": "resnet50", "output_stride": 16, "weights": None}, "lr": 0.01, "head_lr_mult": 10.0,
           "momentum": 0.9, "weight_decay": 1e-4}
PPC_CFG = {"backbone": {"arch": "resnet38", "weights": None, "frozen_bn": True, "frozen_stem": True}, "lr": 0.01,
           "weight_decay": 5e-4, "momentum": 0.9, "ppc": {"variant": "eps"}}


def make_images(root: Path, ids, masks) -> tuple[Path, Path, np.ndarray]:
    img_dir, sal_dir = root / "JPEGImages", root / "SALImages"
    img_dir.mkdir(parents=True)
    sal_dir.mkdir()
    labels = np.zeros((len(ids), 20), np.float32)
    for k, (i, m) in enumerate(zip(ids, masks)):
        Image.fromarray(render_image(m, k)).save(img_dir / f"{i}.jpg", quality=90)
        Image.fromarray(((m > 0) & (m < 255)).astype(np.uint8) * 255).save(sal_dir / f"{i}.png")
        for c in np.unique(m):
            if 0 < c < 255:
                labels[k, c - 1] = 1
        if not labels[k].any():
            labels[k, 0] = 1
    return img_dir, sal_dir, labels


def loader_rate(dataset, batch: int, workers: int, n_batches: int) -> float:
    """images/s of batch_stream over ``dataset`` (first batch excluded: worker start-up)."""
    stream = batch_stream(dataset, batch, 0, 0, workers)
    next(stream)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(stream)
    return n_batches * batch / (time.perf_counter() - t0)


def step_rate(m, cfg, dataset, batch: int, steps: int, device: torch.device, amp: bool = False,
              channels_last: bool = False) -> tuple[float, list[float]]:
    """images/s of ``m.training_step`` + backward + SGD step on batches of ``dataset`` (batches prepared first;
    one warm-up step excluded)."""
    torch.manual_seed(0)
    model = m.build_model(cfg, 20).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(m, model, cfg)
    stream = batch_stream(dataset, batch, 0, 0, 0)
    batches = [batch_to_device(next(stream), device) for _ in range(steps + 1)]
    if channels_last:
        batches = [{k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                    for k, v in b.items()} for b in batches]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad][:3]
    times, losses = [], []
    for i, b in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = m.training_step(model, b, i, cfg)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(out["loss"].detach()))
    after = [p.detach() for p in model.parameters() if p.requires_grad][:3]
    assert all(np.isfinite(losses)), f"non-finite loss {losses}"
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the parameters did not change"
    return batch / min(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per network (after one warm-up step)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader measurement")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ids, masks, source = load_voc_masks(args.images, "train_voc")
    cpu = torch.device("cpu")
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        img_dir, sal_dir, labels = make_images(Path(tmp), ids, masks)
        cls_ds = ClassificationDataset(img_dir, ids, labels, args.crop, (320, 640))
        views_ds = ViewsDataset(img_dir, ids, labels, args.crop, (320, 640), saliency_dir=sal_dir)
        n_load = max(2, args.images // args.batch - 2)
        for name, m, cfg, ds in (("ResNet-50 CAM", cam_method, CAM_CFG, cls_ds),
                                 ("ResNet-38 PPC (EPS, 2 views)", ppc_method, PPC_CFG, views_ds)):
            load0 = loader_rate(ds, args.batch, 0, n_load)
            loadw = loader_rate(ds, args.batch, args.workers, n_load)
            rate, times = step_rate(m, cfg, ds, args.batch, args.steps, cpu)
            best_load = max(load0, loadw)
            ratio = best_load / rate
            met = ratio > 1.0
            print(f"{name}: step {rate:.2f} img/s (batch {args.batch}, crop {args.crop}); loader {load0:.1f} img/s "
                  f"(0 workers), {loadw:.1f} img/s ({args.workers} workers)")
            item = "6a" if m is cam_method else "6b"
            r = result(item, f"Training step, {name} (CPU)", "loader img/s > step img/s",
                       f"step {rate:.2f} img/s", f"loader {best_load:.1f} img/s", ratio, met,
                       baseline_what=f"one training step, fp32, batch {args.batch}, crop {args.crop} (the consumer)",
                       ours_what=f"the stage's dataset + batch_stream, 0 and {args.workers} workers (the producer)",
                       reason="" if met else "data loading is slower than the step",
                       details={"step_img_per_s": rate, "step_seconds": times, "loader_img_per_s_0_workers": load0,
                                f"loader_img_per_s_{args.workers}_workers": loadw, "batch": args.batch,
                                "crop": args.crop, "resize_long": [320, 640], "images": len(ids),
                                "loading_share_of_step_0_workers": rate / load0},
                       data=source)
            r["ratio_fmt"] = "{:.0f}x"
            recs.append(r)
            if torch.cuda.is_available():
                recs.append(_gpu(item, name, m, cfg, ds, args))
            else:
                recs.append(result(item + "g", f"Training step, {name} (GPU, bf16 + channels-last vs fp32)",
                                   "faster than fp32", "—", "—", None, None,
                                   baseline_what="fp32 NCHW step on CUDA",
                                   ours_what="bf16 autocast + channels-last step on CUDA",
                                   reason="not run: no GPU on this machine"))
    write_result(recs, "train_step")
    return 0


def _gpu(item, name, m, cfg, ds, args) -> dict:
    dev = torch.device("cuda")
    base, _ = step_rate(m, cfg, ds, args.batch, 5, dev)
    fast, _ = step_rate(m, cfg, ds, args.batch, 5, dev, amp=True, channels_last=True)
    r = result(item + "g", f"Training step, {name} (GPU, bf16 + channels-last vs fp32)", "faster than fp32",
               f"{base:.1f} img/s", f"{fast:.1f} img/s", fast / base, fast > base,
               baseline_what="fp32 NCHW step on CUDA", ours_what="bf16 autocast + channels-last step on CUDA",
               reason="" if fast > base else "bf16 not faster", details={"gpu": torch.cuda.get_device_name()})
    r["ratio_fmt"] = "{:.2f}x"
    return r


if __name__ == "__main__":
    sys.exit(main())
