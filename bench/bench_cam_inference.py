"""Item 1, CAM inference: multi-scale (1.0, 0.5, 1.5, 2.0) + h-flip CAMs of one VOC-sized image through a ResNet-50
(OS16) CAM network, on the CPU.

- baseline (the reference style of PSA ``infer_cls`` / IRN ``make_cam``): ``torch.no_grad``, one forward per scale
  and flip with a batch of one, NCHW, every class map upsampled on its own to the image size, moved to numpy,
  un-flipped there, summed, then the present classes kept and max-normalised.
- ours (:func:`wsss_core.methods.inference.multiscale_cams` as the ``infer_cams`` stage runs it on the CPU): the
  method's ``cam_forward`` traced, frozen and optimised once per job
  (:func:`~wsss_core.methods.inference.frozen_cam_fn`: BN folded into the convolutions, oneDNN layouts kept between
  layers; its one-off cost is reported apart),
  ``torch.inference_mode``, both flips in one batch, only the present classes kept and un-flipped/summed at the
  network resolution, then one upsampling per scale. Also timed: the eager channels-last path (used on CUDA) and,
  row 1c, the opt-in ``cams.optimize: compile`` path (:func:`~wsss_core.methods.inference.compiled_cam_fn`).
- guard: max |ours - baseline| <= 1e-4 (float32 both), else exit 1.
- GPU (fp32 vs bf16 autocast + channels-last) runs only when CUDA is available.

    python bench/bench_cam_inference.py [--reps 3] [--image PATH] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import VOC_SAMPLE, best_of, best_of_interleaved, render_image, result, write_result

from wsss_core.data.io import read_image
from wsss_core.data.transforms import normalize, resize_pil_bicubic, to_tensor
from wsss_core.methods import cam as cam_method
from wsss_core.methods.cam import CAMNet
from wsss_core.methods.inference import compiled_cam_fn, frozen_cam_fn, multiscale_cams
from wsss_core.models.backbones import build_resnet

SCALES = (1.0, 0.5, 1.5, 2.0)
KEYS = (1, 15)  # two present classes (aeroplane, person): 0-based channels 0 and 14
TOL = 1e-4


def reference_cams(model: CAMNet, image: np.ndarray, scales, keys) -> np.ndarray:
    """The reference style: per scale and per flip one batch-of-one forward, all C maps upsampled and un-flipped on
    their own (numpy), summed; then the present classes, ReLU and per-map max normalisation. float32 (K, H, W)."""
    h, w = image.shape[:2]
    maps = []
    with torch.no_grad():
        for s in scales:
            img = resize_pil_bicubic(image, (max(1, round(h * s)), max(1, round(w * s))))  # PIL bicubic views
            for flip in (False, True):
                x = to_tensor(normalize(np.ascontiguousarray(img[:, ::-1]) if flip else img)).unsqueeze(0)
                cam = model.cam(x)
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
                maps.append(np.flip(cam, -1) if flip else cam)
    total = np.sum(maps, axis=0)[[k - 1 for k in keys]]
    total = np.maximum(total, 0)
    return (total / (total.reshape(len(keys), -1).max(1)[:, None, None] + 1e-5)).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per path, interleaved (the best is reported)")
    ap.add_argument("--image", help="a JPEG (default: a real VOC sample image, else one rendered at 375 x 500)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (about a minute)")
    args = ap.parse_args(argv)

    sample = sorted((VOC_SAMPLE / "JPEGImages").glob("*.jpg")) if VOC_SAMPLE.is_dir() else []
    if args.image:
        image, src = read_image(args.image), args.image
    elif sample:
        image, src = read_image(sample[0]), f"real VOC image {sample[0].name}"
    else:
        mask = np.zeros((375, 500), np.uint8)
        mask[80:300, 120:380] = 15
        image, src = render_image(mask, 0), "rendered 375 x 500 image (../shared absent)"
    torch.manual_seed(0)
    model = CAMNet(build_resnet("resnet50", output_stride=16), 20).eval()
    for m in model.modules():  # non-trivial BN statistics, as in a trained network
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    cpu = torch.device("cpu")
    classes = [k - 1 for k in KEYS]
    # ours, as stages.classifier.infer_cams runs it on the CPU: the method's cam_forward frozen once per job
    t0 = time.perf_counter()
    frozen, how = frozen_cam_fn(model, cam_method.cam_forward)
    t_compile = time.perf_counter() - t0
    if not how.startswith("TorchScript"):
        print(f"FAIL: frozen_cam_fn fell back to {how}", file=sys.stderr)
        return 1
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the eager path (CUDA, or optimize: false)
    compiled, how_c, t_compile_c = None, "not run (--no-compile)", None
    if not args.no_compile:
        t0 = time.perf_counter()
        compiled, how_c = compiled_cam_fn(model, cam_method.cam_forward)
        t_compile_c = time.perf_counter() - t0
        print(f"cams.optimize: compile: {how_c} ({t_compile_c:.0f} s)")
        if how_c.startswith("eager"):
            compiled = None

    def ours():
        return multiscale_cams(frozen, image, SCALES, True, cpu, classes=classes, channels_last=False)

    def eager_cl():
        return multiscale_cams(lambda x: cl_model.cam(x), image, SCALES, True, cpu, classes=classes)

    def base():
        return reference_cams(model, image, SCALES, KEYS)

    # warm-up at the smallest scale only (oneDNN primitive creation), then timed runs
    reference_cams(model, image, (0.5,), KEYS)
    multiscale_cams(frozen, image, (0.5,), True, cpu, classes=classes, channels_last=False)
    multiscale_cams(lambda x: cl_model.cam(x), image, (0.5,), True, cpu, classes=classes)
    fns = {"base": base, "ours": ours, "eager_cl": eager_cl}
    if compiled is not None:
        fns["compiled"] = lambda: multiscale_cams(compiled, image, SCALES, True, cpu, classes=classes,
                                                  channels_last=False)
        multiscale_cams(compiled, image, (0.5,), True, cpu, classes=classes, channels_last=False)
    timed = best_of_interleaved(fns, args.reps)
    (t_base, base_times, ref), (t_ours, ours_times, out) = timed["base"], timed["ours"]
    t_cl, cl_times, out_cl = timed["eager_cl"]
    if compiled is not None:
        t_comp, comp_times, out_comp = timed["compiled"]
        diff_comp = float(np.abs(out_comp - ref).max())
        if not diff_comp <= TOL:
            print(f"FAIL: the compiled path differs from the reference by {diff_comp:.3e} > {TOL}", file=sys.stderr)
            return 1
    diff = float(np.abs(out - ref).max())
    diff_cl = float(np.abs(out_cl - ref).max())
    print(f"CAM inference on {src} {image.shape[:2]}: baseline {t_base:.2f} s, ours {t_ours:.2f} s "
          f"(+{t_compile:.1f} s once per job), x{t_base / t_ours:.2f}; eager channels-last {t_cl:.2f} s; "
          f"max abs diff {diff:.2e} / {diff_cl:.2e}")
    if not (diff <= TOL and diff_cl <= TOL):
        print(f"FAIL: ours differs from the reference by {max(diff, diff_cl):.3e} > {TOL}", file=sys.stderr)
        return 1
    ratio = t_base / t_ours
    met = ratio >= 2.0
    details = {"image": src, "image_hw": list(image.shape[:2]), "scales": list(SCALES), "flip": True,
               "keys": list(KEYS), "reps": args.reps, "baseline_s": base_times, "ours_s": ours_times,
               "ours_compile_once_per_job_s": t_compile, "ours_how": how,
               "eager_channels_last_s": cl_times, "eager_channels_last_speedup": t_base / t_cl,
               "max_abs_diff": diff, "max_abs_diff_eager_channels_last": diff_cl, "tolerance": TOL,
               "threads": torch.get_num_threads()}
    recs = [result("1", "CAM inference (CPU, fp32)", "≥ 2x, max abs diff ≤ 1e-4", f"{t_base:.2f} s/image",
                   f"{t_ours:.2f} s/image (+{t_compile:.0f} s once per job)", ratio, met,
                   baseline_what="no_grad, 8 batch-of-1 forwards (4 scales x flip), NCHW, each map upsampled alone",
                   ours_what="multiscale_cams over frozen_cam_fn (TorchScript frozen: BN folded, oneDNN "
                             "layouts), inference_mode, flips batched, present classes only, one upsampling per scale",
                   reason="" if met else (
                       f"x{ratio:.2f} < 2: ours runs the same eight fp32 ResNet-50 forwards as the reference and is "
                       "bound by the convolutions; the frozen graph removes the BatchNorm passes (14 % of the eager "
                       "time; ReLU and adds, 18 %, stay separate), batching and per-class upsampling save little. 2x "
                       "would need "
                       "fewer or cheaper (bf16) convolutions, which the 1e-4 float32 guard rules out on the CPU "
                       f"(max abs diff here {diff:.1e})"),
                   details=details, data=src)]
    recs[0]["ratio_fmt"] = "{:.2f}x"
    if compiled is not None:
        rc = t_base / t_comp
        recs.append(result("1c", "CAM inference (CPU, fp32), cams.optimize: compile (opt-in)",
                           "≥ 2x, max abs diff ≤ 1e-4", f"{t_base:.2f} s/image",
                           f"{t_comp:.2f} s/image (+{t_compile_c:.0f} s once per job)", rc, rc >= 2.0,
                           baseline_what="as row 1",
                           ours_what="multiscale_cams over compiled_cam_fn (torch.compile, inductor freezing, "
                                     "dynamic shapes: one compilation per job for every size)",
                           reason="" if rc >= 2.0 else f"x{rc:.2f} < 2 (conv-bound, as row 1)",
                           details={"compiled_s": comp_times, "compile_once_per_job_s": t_compile_c,
                                    "max_abs_diff": diff_comp, "how": how_c}, data=src))
        recs[-1]["ratio_fmt"] = "{:.2f}x"
    else:
        recs.append(result("1c", "CAM inference (CPU, fp32), cams.optimize: compile (opt-in)",
                           "≥ 2x, max abs diff ≤ 1e-4", "—", "—", None, None, baseline_what="as row 1",
                           ours_what="compiled_cam_fn", reason=f"not run: {how_c}", data=src))
    if torch.cuda.is_available():
        recs.append(_gpu(model, image, classes))
    else:
        recs.append(result("1g", "CAM inference (GPU, bf16 + channels-last vs fp32)", "faster than fp32", "—", "—",
                           None, None, baseline_what="fp32 NCHW multiscale_cams on CUDA",
                           ours_what="bf16 autocast + channels-last multiscale_cams on CUDA",
                           reason="not run: no GPU on this machine", data=src))
    write_result(recs, "cam_inference")
    return 0


def _gpu(model: CAMNet, image: np.ndarray, classes) -> dict:
    dev = torch.device("cuda")
    fp32 = copy.deepcopy(model).to(dev)
    fast = copy.deepcopy(model).to(dev).to(memory_format=torch.channels_last)

    def run(m, amp, cl):
        out = multiscale_cams(lambda x: m.cam(x), image, SCALES, True, dev, classes=classes, channels_last=cl,
                              amp=amp)
        torch.cuda.synchronize()
        return out

    t32, _, a = best_of(lambda: run(fp32, False, False), 5, warmup=2)
    tbf, _, b = best_of(lambda: run(fast, True, True), 5, warmup=2)
    diff = float(np.abs(a - b).max())
    r = result("1g", "CAM inference (GPU, bf16 + channels-last vs fp32)", "faster than fp32", f"{t32 * 1e3:.1f} ms",
               f"{tbf * 1e3:.1f} ms", t32 / tbf, t32 / tbf > 1.0, baseline_what="fp32 NCHW multiscale_cams on CUDA",
               ours_what="bf16 autocast + channels-last multiscale_cams on CUDA",
               reason="" if t32 / tbf > 1.0 else "bf16 not faster on this GPU",
               details={"max_abs_diff_bf16_vs_fp32": diff, "gpu": torch.cuda.get_device_name()})
    r["ratio_fmt"] = "{:.2f}x"
    return r


if __name__ == "__main__":
    sys.exit(main())
