"""Item 9, COCO class masks: masks/s and peak memory of turning a COCO instances file into uint8 class masks (0
background, 1..80 classes in category-id order, 255 crowd), on a synthetic COCO-like file (default 4,000 images of
480x640, about 7 instances each: star-shaped polygons with 2-decimal coordinates, some in two parts, and on 8 % of
the images a crowd region as uncompressed RLE; the 80 real COCO category ids and names; 1 % of the images without
annotations). Real COCO is not used: the images and annotations are a 19 GB download (``COCO_HOWTO``).

- baseline: a plain per-image pycocotools loop: ``COCO(annFile)``, then per annotated image ``getAnnIds`` /
  ``loadAnns`` / ``annToMask`` of each annotation, painted with boolean indexing over the whole image (crowds 255
  first, then the others in file order);
- ours: :class:`wsss_core.data.coco.CocoIndex` (compact column-wise index) and :func:`~wsss_core.data.coco.class_mask`
  (one ``frPyObjects`` call per image for all polygons, one ``decode`` for all instances, painting inside each
  instance's box) with the same convention (``crowd="ignore"``, ``overlap="later"``);
- each path runs in its own fresh process (so its peak RSS, VmHWM of /proc/self/status, is its own), the two in turns;
  masks/s counts the load of the file and the masks of every annotated image;
- guard: identical masks (a digest of every mask's bytes, plus ``np.array_equal`` on the first 20 images in this
  process), else exit 1.

    python bench/bench_coco_masks.py [--images 4000] [--height 480] [--width 640] [--instances 7] [--reps 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Stopwatch, result, write_result

from wsss_core.data.coco import COCO_CLASSES, CocoIndex, category_map, class_mask

#: the 80 COCO category ids (1..90 with 10 unused ids), in the order of COCO_CLASSES[1:]
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
N_CHECK = 20


# ---- the synthetic instances file

def _rle_counts(m: np.ndarray) -> list[int]:
    flat = m.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + counts) if flat[0] == 1 else counts


def _star(rng, cx, cy, r, h, w) -> list[float]:
    n = int(rng.integers(6, 40))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.55, 1.0, n)
    x = np.clip(cx + rad * np.cos(ang), 0, w)
    y = np.clip(cy + rad * np.sin(ang), 0, h)
    return np.round(np.stack([x, y], 1).reshape(-1), 2).tolist()


def make_instances(path: Path, n_images: int, h: int, w: int, per_image: float, seed: int = 0) -> dict:
    """Write a synthetic COCO-like instances file; returns counts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    images, anns, n_crowd, n_poly_parts = [], [], 0, 0
    image_ids = np.sort(rng.choice(np.arange(1, 600_000), n_images, replace=False))
    for img_id in image_ids.tolist():
        images.append({"id": img_id, "file_name": f"COCO_val2014_{img_id:012d}.jpg", "height": h, "width": w})
        if rng.random() < 0.01:
            continue  # no annotation
        for _ in range(max(1, int(rng.poisson(per_image)))):
            r = float(np.exp(rng.uniform(np.log(8), np.log(min(h, w) / 2.5))))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            polys = [_star(rng, cx, cy, r, h, w)]
            if rng.random() < 0.1:
                polys.append(_star(rng, cx + rng.uniform(-2, 2) * r, cy + rng.uniform(-2, 2) * r, r / 2, h, w))
            n_poly_parts += len(polys)
            xy = np.array(polys[0]).reshape(-1, 2)
            area = 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1))))
            x0, y0 = xy.min(0)
            x1, y1 = xy.max(0)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(rng.choice(COCO_IDS)),
                         "iscrowd": 0, "area": round(area, 2), "bbox": [round(float(v), 2) for v in
                                                                      (x0, y0, x1 - x0, y1 - y0)],
                         "segmentation": polys})
        if rng.random() < 0.08:  # a crowd region (COCO writes crowds as uncompressed RLE)
            cx, cy, a, b = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, w / 3), rng.uniform(20, h / 3)
            m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
            if m.any():
                ys, xs = np.nonzero(m)
                anns.append({"id": 900100000000 + img_id, "image_id": img_id, "category_id": 1, "iscrowd": 1,
                             "area": float(m.sum()), "bbox": [float(xs.min()), float(ys.min()),
                                                             float(xs.max() - xs.min() + 1),
                                                             float(ys.max() - ys.min() + 1)],
                             "segmentation": {"counts": _rle_counts(m), "size": [h, w]}})
                n_crowd += 1
    # COCO's annotation list is not sorted by image: shuffle it
    anns = [anns[k] for k in rng.permutation(len(anns)).tolist()]
    doc = {"info": {"description": "synthetic COCO-sized instances (wsss-flow bench)"}, "licenses": [],
           "images": images, "annotations": anns,
           "categories": [{"id": i, "name": n.replace("_", " "), "supercategory": "x"}
                          for i, n in zip(COCO_IDS, COCO_CLASSES[1:])]}
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return {"images": n_images, "annotations": len(anns), "crowd": n_crowd, "polygon_parts": n_poly_parts,
            "file_mb": round(path.stat().st_size / 2 ** 20, 1)}


# ---- the two paths

def baseline_masks(ann_file: Path):
    """Yields (stem, mask): the plain per-image pycocotools loop."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(str(ann_file))
    cat_map = {c: k + 1 for k, c in enumerate(sorted(coco.getCatIds()))}
    stems = sorted((Path(coco.imgs[i]["file_name"]).stem, i) for i in coco.imgToAnns if coco.imgToAnns[i])
    yield len(stems)
    for stem, img_id in stems:
        img = coco.imgs[img_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
        seg = np.zeros((img["height"], img["width"]), np.uint8)
        for a in anns:
            if a["iscrowd"]:
                seg[coco.annToMask(a) == 1] = 255
        for a in anns:
            if not a["iscrowd"]:
                seg[coco.annToMask(a) == 1] = cat_map[a["category_id"]]
        yield stem, seg


def our_masks(ann_file: Path):
    idx = CocoIndex.load(ann_file)
    cat_map = category_map(idx.categories)
    stems = idx.stems()
    yield len(stems)
    for stem in stems:
        h, w = idx.size(stem)
        yield stem, class_mask(h, w, idx.annotations(stem), cat_map)


PATHS = {"baseline": baseline_masks, "ours": our_masks}


def _vm(key: str) -> float:
    """A memory figure of this process from /proc/self/status in MB: VmRSS (now) or VmHWM (peak RSS). Not
    ``resource.getrusage``'s ru_maxrss: after fork + exec that keeps the parent's peak when it was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(path: str, ann_file: Path) -> dict:
    """Run one path in this (fresh) process: times, digests and peak RSS."""
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools 2.0.x under numpy 2
    rss0 = _vm("VmRSS")
    sw = Stopwatch()
    t0 = time.perf_counter()
    with sw:
        gen = PATHS[path](ann_file)
        n = next(gen)
    load_s = time.perf_counter() - t0
    digests = []
    while True:
        with sw:
            item = next(gen, None)
        if item is None:
            break
        stem, m = item
        digests.append(f"{stem}:{m.shape[0]}x{m.shape[1]}:{hashlib.blake2b(m.tobytes(), digest_size=16).hexdigest()}")
    return {"n": n, "load_s": load_s, "total_s": sw.seconds, "masks_s": sw.seconds - load_s,
            "rss_after_imports_mb": rss0, "peak_rss_mb": _vm("VmHWM"), "digests": digests}


def run_worker(path: str, ann_file: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", path, "--ann", str(ann_file)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--instances", type=float, default=7.0, help="mean non-crowd instances per image (Poisson)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each path (fresh processes, in turns)")
    ap.add_argument("--worker", choices=sorted(PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--ann", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ann)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        ann_file = Path(tmp) / "instances_synthetic.json"
        t0 = time.perf_counter()
        data = make_instances(ann_file, args.images, args.height, args.width, args.instances)
        data["generate_s"] = round(time.perf_counter() - t0, 1)
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(max(1, args.reps)):
            for path in ("baseline", "ours"):
                runs[path].append(run_worker(path, ann_file))
        # direct array comparison on the first images, in this process
        base_gen, our_gen = baseline_masks(ann_file), our_masks(ann_file)
        n_base, n_ours = next(base_gen), next(our_gen)
        direct_ok = n_base == n_ours
        for _ in range(min(N_CHECK, n_base)):
            (sb, mb), (so, mo) = next(base_gen), next(our_gen)
            direct_ok &= sb == so and np.array_equal(mb, mo)

    dig = {p: r[-1]["digests"] for p, r in runs.items()}
    n_diff = sum(a != b for a, b in zip(dig["baseline"], dig["ours"])) + abs(len(dig["baseline"]) - len(dig["ours"]))
    ok = direct_ok and n_diff == 0 and all(len(r["digests"]) == r["n"] for rs in runs.values() for r in rs)
    best = {p: min(rs, key=lambda r: r["total_s"]) for p, rs in runs.items()}
    n = best["ours"]["n"]
    rate = {p: n / b["total_s"] for p, b in best.items()}
    rate_masks = {p: n / b["masks_s"] for p, b in best.items()}
    peak = {p: max(r["peak_rss_mb"] for r in rs) for p, rs in runs.items()}
    base0 = {p: min(r["rss_after_imports_mb"] for r in rs) for p, rs in runs.items()}
    ratio = rate["ours"] / rate["baseline"]
    met = ok and ratio >= 1.5
    reason = "" if met else (f"x{ratio:.2f} < 1.5" if ok else f"masks differ ({n_diff} of {n} images)")
    size = f"{args.images} images of {args.height}x{args.width}, ~{args.instances:g} instances each"
    rec = result("9", f"COCO class masks ({size}, CPU)", "≥ 1.5x masks/s, identical masks",
                 f"{rate['baseline']:.0f} masks/s, peak RSS {peak['baseline']:.0f} MB",
                 f"{rate['ours']:.0f} masks/s, peak RSS {peak['ours']:.0f} MB", ratio, met,
                 baseline_what="COCO(annFile), per image getAnnIds/loadAnns/annToMask per annotation, "
                               "seg[m == 1] = value over the whole image (crowds 255 first)",
                 ours_what="CocoIndex.load (compact column-wise index) + class_mask (one frPyObjects call and one "
                           "decode per image, painting inside each instance's box)",
                 unit_note="masks/s = annotated images / (load + all masks), best run of each path in a fresh "
                           "process; peak RSS = VmHWM of that process (includes the interpreter and imports, ~40 MB)",
                 reason=reason,
                 details={**{f"{p}_runs": [{k: v for k, v in r.items() if k != "digests"} for r in rs]
                             for p, rs in runs.items()},
                          "masks_per_s_total": rate, "masks_per_s_excluding_load": rate_masks,
                          "load_s": {p: b["load_s"] for p, b in best.items()},
                          "peak_rss_mb": peak, "rss_after_imports_mb": base0,
                          "peak_rss_growth_mb": {p: peak[p] - base0[p] for p in peak},
                          "images_compared": n, "images_differing": n_diff, "direct_check_images": N_CHECK,
                          "direct_check_ok": bool(direct_ok), "convention": "crowd='ignore', overlap='later'",
                          "synthetic_file": data},
                 data=f"synthetic COCO instances file ({data['annotations']} annotations, {data['crowd']} crowd, "
                      f"{data['file_mb']} MB), real COCO category ids")
    rec["ratio_fmt"] = "{:.2f}x"
    write_result(rec, "coco_masks")
    if not ok:
        print(f"GUARD FAILED: masks differ on {n_diff} of {n} images (direct check ok: {direct_ok})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
