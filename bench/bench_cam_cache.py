"""Item 3, CAM cache: bytes per image and load time of the CAM store, on real VOC masks' synthetic CAMs
(:func:`common.synth_cams`: stride-16 maps bilinearly upsampled, ReLU'd, max-normalised, as the pipeline writes).

- baseline (the reference style of IRN ``make_cam`` / PSA ``infer_cls``): one ``<id>.npy`` per image holding a
  pickled dict ``{"keys": int array, "high_res": float32 (K, H, W)}``; loaded with
  ``np.load(allow_pickle=True).item()``.
- ours: :class:`wsss_core.store.ShardWriter` / :class:`wsss_core.store.ShardedStore` as the pipeline uses them: one
  HDF5 shard, float16 maps, one chunk per map, byte-shuffle filter + gzip; loaded with ``store[id]`` (float32). Loads are timed with a fresh store handle, after
  the files were written (both from the page cache).
- guard: the loaded maps equal the float32 maps within the float16 rounding (|d| <= 2**-11 * max(1, |x|)) and keys
  are identical, else exit 1.

    python bench/bench_cam_cache.py [--images 300] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import Stopwatch, best_of, load_voc_masks, result, synth_cams, write_result

from wsss_core.store import ShardedStore, ShardWriter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    ids, masks, source = load_voc_masks(args.images, "train_voc")
    data = {i: synth_cams(m, k) for k, (i, m) in enumerate(zip(ids, masks))}
    n = len(ids)
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / "out" if (Path(__file__).parent / "out").is_dir()
                                     else None) as tmp:
        tmp = Path(tmp)
        npy_dir = tmp / "npy"
        npy_dir.mkdir()
        shard = tmp / "cams_0.h5"
        w_base, w_ours = Stopwatch(), Stopwatch()
        with w_base:
            for i, (keys, cams) in data.items():
                np.save(npy_dir / f"{i}.npy", {"keys": keys, "high_res": cams})
        with w_ours:
            with ShardWriter(shard, "cams", {"split": "bench"}) as w:
                for i, (keys, cams) in data.items():
                    w.add_cams(i, keys, cams)
        b_base = sum(p.stat().st_size for p in npy_dir.iterdir())
        b_ours = shard.stat().st_size

        def load_base():
            return {i: np.load(npy_dir / f"{i}.npy", allow_pickle=True).item() for i in ids}

        def load_ours():
            with ShardedStore([shard]) as store:
                return {i: store[i] for i in ids}

        t_base, base_times, got_base = best_of(load_base, args.reps, warmup=1)
        t_ours, ours_times, got_ours = best_of(load_ours, args.reps, warmup=1)
    worst = 0.0
    for i, (keys, cams) in data.items():
        k, c = got_ours[i]
        if not np.array_equal(k, keys) or not np.array_equal(got_base[i]["keys"], keys):
            print(f"FAIL: keys of {i} differ", file=sys.stderr)
            return 1
        if not np.array_equal(got_base[i]["high_res"], cams):
            print(f"FAIL: the .npy maps of {i} differ", file=sys.stderr)
            return 1
        err = np.abs(c - cams) / np.maximum(1.0, np.abs(cams))
        worst = max(worst, float(err.max()))
    if not worst <= 2.0 ** -11:
        print(f"FAIL: stored maps differ by {worst:.2e} (> float16 rounding)", file=sys.stderr)
        return 1
    byte_ratio = b_ours / b_base
    load_speedup = t_base / t_ours
    met = byte_ratio <= 0.3 and load_speedup > 1.0
    reasons = []
    if byte_ratio > 0.3:
        reasons.append(f"bytes x{byte_ratio:.2f} > 0.3")
    if load_speedup <= 1.0:
        reasons.append(f"loading is x{1 / load_speedup:.2f} slower than np.load of the float32 .npy dicts "
                       "(gzip decompression + h5py's per-dataset overhead vs reading a page-cached file)")
    print(f"{n} images: .npy dicts {b_base / n / 1e3:.0f} kB/image, HDF5 shard {b_ours / n / 1e3:.0f} kB/image "
          f"(x{byte_ratio:.3f}); load {t_base / n * 1e3:.2f} vs {t_ours / n * 1e3:.2f} ms/image (x{load_speedup:.2f})")
    details = {"images": n, "reps": args.reps, "npy_bytes": b_base, "h5_bytes": b_ours,
               "npy_kB_per_image": b_base / n / 1e3, "h5_kB_per_image": b_ours / n / 1e3, "byte_ratio": byte_ratio,
               "npy_load_ms_per_image": t_base / n * 1e3, "h5_load_ms_per_image": t_ours / n * 1e3,
               "load_speedup": load_speedup, "npy_write_s": w_base.seconds, "h5_write_s": w_ours.seconds,
               "max_rel_err_float16": worst,
               "mean_maps_per_image": float(np.mean([len(k) for k, _ in data.values()]))}
    rec = result("3", "CAM cache (bytes, load)", "bytes ≤ 0.3x, faster load",
                 f"{b_base / n / 1e3:.0f} kB, {t_base / n * 1e3:.2f} ms /image",
                 f"{b_ours / n / 1e3:.0f} kB, {t_ours / n * 1e3:.2f} ms /image",
                 byte_ratio, met, baseline_what="per-image float32 .npy dict (IRN/PSA style)",
                 ours_what="HDF5 shard (ShardWriter: float16, one chunk per map, byte-shuffle + gzip 4) read through "
                           "ShardedStore",
                 reason="; ".join(reasons), details=details, data=source)
    rec["ratio_fmt"] = "{:.2f}x bytes, " + f"{load_speedup:.2f}x load"
    write_result([rec], "cam_cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
