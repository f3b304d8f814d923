"""Item 7, superpixel refinement: per VOC-sized image (a VOC sample image when ../shared is present, resized to the
next multiple of 16), the superpixel network's Q (SpixelFCN layout, random weights, eval mode), the ASAM and 20
superpixel random-walk steps of a 21-channel superpixel map, then PSAM upsampling.

- baseline: a plain re-creation of the reference's per-image loop (CHENDL-SHEN/ESC ``tools/general/Q_util.py``:
  ``calc_affmat`` = a tiled 25-id one-hot map, ``upfeat`` (9 padded, shifted, nearest-upsampled copies), ``poolfeat``
  (9 average pools with padding and shifted crops), a gather into offset order; ``refine_with_affmat`` = 25 shifted
  views stacked and weighted, per step);
- ours: :func:`wsss_core.superpixel.ops.asam` (the 81 candidate-cell pairs, no one-hot map) and
  :func:`~wsss_core.superpixel.ops.random_walk`;
- guard: the ASAM, the walked map and the upsampled map agree within 1e-5 (float32), else exit 1.

    python bench/bench_superpixels.py [--images 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import VOC_SAMPLE, best_of_interleaved, result, write_result

from wsss_core.superpixel import ops
from wsss_core.superpixel.scn import SpixelNet

S = ops.CELL


# ---- a plain re-creation of the reference's operators (written from the description in the module docstring)

def ref_pool(f, q):
    b, _, hh, ww = f.shape
    f1 = torch.cat([f, torch.ones_like(f[:, :1])], 1)
    acc = 0
    for k, (dy, dx) in enumerate(ops.OFFSETS9):
        pooled = F.pad(F.avg_pool2d(f1 * q[:, k:k + 1], S), (1, 1, 1, 1))
        h, w = hh // S, ww // S
        acc = acc + pooled[:, :, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    return acc[:, :-1] / (acc[:, -1:] + 1e-8)


def ref_up(x, q):
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = 0
    for k, (dy, dx) in enumerate(ops.OFFSETS9):
        view = xp[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        out = out + F.interpolate(view, size=(h * S, w * S), mode="nearest") * q[:, k:k + 1]
    return out


def ref_asam(q):
    b, _, hh, ww = q.shape
    h, w = hh // S, ww // S
    ids = (torch.arange(h)[:, None] % 5) * 5 + torch.arange(w)[None, :] % 5          # id of cell (y, x)
    onehot = F.one_hot(ids, 25).permute(2, 0, 1)[None].float().expand(b, -1, -1, -1)
    weights = ref_pool(ref_up(onehot, q), q)                                         # (B, 25 ids, h, w)
    order = torch.empty(25, h, w, dtype=torch.long)                                 # channel j <- id of s + e_j
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
    for j, (dy, dx) in enumerate(ops.OFFSETS25):
        order[j] = ((ys + dy) % 5) * 5 + (xs + dx) % 5
    return torch.gather(weights, 1, order[None].expand(b, -1, -1, -1))


def ref_walk(x, a, steps):
    h, w = x.shape[-2:]
    for _ in range(steps):
        xp = F.pad(x, (2, 2, 2, 2))
        views = torch.stack([xp[:, :, i:i + h, j:j + w] for i in range(5) for j in range(5)], 1)
        x = (views * a[:, :, None]).sum(1)
    return x


def load_images(n: int) -> tuple[list[np.ndarray], str]:
    jpgs = sorted((VOC_SAMPLE / "JPEGImages").glob("*.jpg")) if VOC_SAMPLE.is_dir() else []
    if jpgs:
        from wsss_core.data.io import read_image

        return [read_image(p) for p in jpgs[:n]], f"VOC sample images ({VOC_SAMPLE})"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (375, 500, 3), dtype=np.uint8) for _ in range(n)], "random 375x500 images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = SpixelNet().eval()
    images, data = load_images(args.images)
    inputs = []
    for img in images:
        hh, ww = (int(math.ceil(s / S) * S) for s in img.shape[:2])
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
        z = torch.randn(1, 21, hh // S, ww // S, generator=torch.Generator().manual_seed(len(inputs)))
        inputs.append((x, torch.softmax(z, 1)))

    @torch.no_grad()
    def run(asam, walk, up):
        out = []
        for x, p in inputs:
            q = net(x)
            a = asam(q)
            out.append((a, up(walk(p, a, args.steps), q)))
        return out

    timed = best_of_interleaved({"baseline": lambda: run(ref_asam, ref_walk, ref_up),
                                 "ours": lambda: run(ops.asam, ops.random_walk, ops.up)}, reps=args.reps)
    (tb, all_b, base), (to, all_o, ours) = timed["baseline"], timed["ours"]
    diff_a = max(float((a - b).abs().max()) for (a, _), (b, _) in zip(base, ours))
    diff_m = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(base, ours))
    ok = diff_a <= 1e-5 and diff_m <= 1e-5
    n = len(inputs)
    rec = result("7", "Superpixel refinement: Q + ASAM + 20 RW steps + PSAM up (CPU)", "same numbers (≤ 1e-5)",
                 f"{tb / n * 1e3:.0f} ms/image", f"{to / n * 1e3:.0f} ms/image", tb / to, ok,
                 baseline_what="ESC Q_util style: one-hot id map through upfeat/poolfeat, gather; 25 stacked views "
                               "per walk step",
                 ours_what="ops.asam (81 candidate pairs) + ops.random_walk + ops.up",
                 unit_note="ratio = baseline time / ours (informational; the goal is equal numbers)",
                 details={"images": n, "sizes": [list(x.shape[-2:]) for x, _ in inputs], "steps": args.steps,
                          "baseline_s": all_b, "ours_s": all_o, "max_abs_diff_asam": diff_a,
                          "max_abs_diff_map": diff_m},
                 data=data)
    rec["ratio_fmt"] = "{:.2f}x"
    write_result(rec, "superpixels")
    if not ok:
        print(f"GUARD FAILED: ASAM diff {diff_a:.2e}, map diff {diff_m:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
