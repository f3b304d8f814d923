"""Multi-scale + flip CAM inference shared by all methods."""

from __future__ import annotations

import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import normalize, resize_pil_bicubic, to_tensor


def scaled_views(image: np.ndarray, scales: Sequence[float], flip: bool,
                 device: torch.device, channels_last: bool = False) -> Iterator[torch.Tensor]:
    """Per scale s: the uint8 (H, W, 3) image resized with PIL bicubic to (round(H s), round(W s)) (Python's
    round, half to even, as ``np.round``; at least 1), normalised, as a batch (1, 3, h, w), or (2, 3, h, w) =
    [img, hflip img] with ``flip``, on ``device``; in the channels-last memory layout (same values and shape) with
    ``channels_last``. A scale that keeps the size (1.0) uses the image as is.

    The references' image pyramids, reproduced bit for bit (:func:`~wsss_core.data.transforms.resize_pil_bicubic`):
    ``chenqi1126/SIPE`` and ``Barrett-python/SFC`` ``data/data_voc.py::VOC12ClassificationDatasetMSF`` (s == 1 kept,
    else ``tool/imutils.py::pil_rescale``: ``int(np.round(h * s))``, PIL ``Image.BICUBIC``), ``usr922/wseg`` /
    ``obeychoi0120/PixMatch`` ``contrast_infer.py::preprocess`` (PPC, FSAE: ``image.resize((round(W s), round(H s)),
    Image.BICUBIC)``) and ``xulianuwa/MCTformer`` ``datasets.py::VOC12DatasetMS`` (the same, unit 1). PIL
    antialiases when shrinking; ``cv2.INTER_CUBIC`` does not (tens of grey levels apart at 0.5)."""
    h, w = image.shape[:2]
    for s in scales:
        img = resize_pil_bicubic(image, (max(1, round(h * s)), max(1, round(w * s))))
        x = to_tensor(normalize(img)).unsqueeze(0)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        x = x.to(device)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


def method_cams(m, model, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
                device: torch.device, amp: bool = False,
                cam_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(keys_out, cams, aux)`` of one image by method module ``m``: its own ``infer_cams`` if it has one (e.g.
    SIPE: a bg map first), else :func:`multiscale_cams` over its ``cam_forward`` for the present ``keys``
    (``amp``: bf16 autocast on CUDA, see there). ``cam_fn`` replaces ``lambda x: m.cam_forward(model, x)`` (e.g.
    the :func:`frozen_cam_fn` of it, which takes NCHW views)."""
    if hasattr(m, "infer_cams"):
        return m.infer_cams(model, image, keys, scales, flip, device)
    fn = cam_fn if cam_fn is not None else (lambda x: m.cam_forward(model, x))
    cams = multiscale_cams(fn, image, scales, flip, device, classes=[k - 1 for k in keys], amp=amp,
                           channels_last=cam_fn is None)
    return keys, cams, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"


class _CamModule(nn.Module):
    """``forward(x) = fn(model, x)``: a method's CAM function as a module, so that it can be traced and frozen."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, x)


def frozen_cam_fn(model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                  trace_hw: tuple[int, int] = (64, 80), check_hw: tuple[int, int] = (72, 56),
                  rtol: float = 1e-4) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A CPU inference version of ``x -> fn(model, x)`` ((B, 3, h, w) -> (B, C, h', w')): traced with TorchScript
    on a (2, 3, *trace_hw) input, frozen and optimised for inference (BatchNorm folded into the convolutions, whose
    weights are prepacked, oneDNN layouts kept between layers; the BatchNorm passes are ~14 % of the eager CPU time of
    a ResNet-50 CAM network; bench/bench_cam_inference.py measures it). ``model`` must be in eval mode; it is not
    changed. The one-off cost (trace, freeze, check) is about a second for a ResNet-50.

    Tracing records the operations for one input; a function whose graph depends on the input size (a Python int
    taken from a shape) would be wrong at other sizes. So the frozen function is compared with the eager one on a
    (1, 3, *check_hw) input (another batch and size): if tracing fails or the maps differ by more than ``rtol`` times
    their maximum, the eager function is returned instead. Returns (function, a one-line note of what was used).
    """
    eager = lambda x: fn(model, x)  # noqa: E731
    if model.training:
        return eager, "eager (model in training mode)"
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = torch.Generator().manual_seed(0)
            wrapped = _CamModule(model, fn).eval()
            traced = torch.jit.trace(wrapped, torch.randn(2, 3, *trace_hw, generator=gen), check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            differs = _differs(eager, frozen, torch.randn(1, 3, *check_hw, generator=gen), rtol)
        if differs:
            return eager, f"eager (frozen trace differs at another size: {differs})"
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to the eager function
        return eager, f"eager (tracing failed: {_first_line(exc)})"
    return _no_grad(frozen), "TorchScript frozen + optimize_for_inference (checked against eager at another size)"


def compiled_cam_fn(model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    check_hw: tuple[int, int] = (72, 56), rtol: float = 1e-4
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A CPU inference version of ``x -> fn(model, x)`` by ``torch.compile`` (inductor, weights frozen as constants,
    dynamic shapes so that one compilation serves every image size and scale): BatchNorm folded and pointwise ops
    fused into the convolutions where inductor can, generated C++ for the rest. At least as fast as
    :func:`frozen_cam_fn` on a ResNet-50, but the first call compiles for one to two minutes (needs a C++ compiler),
    so it suits long jobs (``cams.optimize: compile``; bench/bench_cam_inference.py row 1c).
    Checked against the eager function on a (2, 3, *check_hw) input (which also triggers the compilation); on any
    failure or a difference above ``rtol`` times the maps' maximum the eager function is returned.
    Returns (function, a one-line note of what was used)."""
    eager = lambda x: fn(model, x)  # noqa: E731
    if model.training:
        return eager, "eager (model in training mode)"
    try:
        compiled = torch.compile(_CamModule(model, fn).eval(), dynamic=True, options={"freezing": True})
        with torch.no_grad():
            x = torch.randn(2, 3, *check_hw, generator=torch.Generator().manual_seed(0))
            differs = _differs(eager, compiled, x, rtol)
        if differs:
            return eager, f"eager (compiled function differs: {differs})"
    except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op, ...: the eager function
        return eager, f"eager (torch.compile failed: {_first_line(exc)})"
    return _no_grad(compiled), "torch.compile (inductor, freezing, dynamic shapes; checked against eager)"


def _differs(eager: Callable, fast: Callable, x: torch.Tensor, rtol: float) -> str:
    """'' when ``fast(x)`` equals ``eager(x)`` within ``rtol`` times the maps' maximum, else what differs."""
    a, b = eager(x).float(), fast(x).float()
    scale = float(a.abs().max())
    err = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
    return "" if err <= rtol * max(scale, 1e-12) else f"{err:.2e} of max {scale:.2e}"


def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> fn(x.contiguous())`` without autograd (the frozen / compiled graphs take NCHW-contiguous inputs)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x.contiguous())

    return run


@torch.inference_mode()
def multiscale_cams(cam_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, scales: Sequence[float],
                    flip: bool, device: torch.device, classes: Sequence[int] | None = None,
                    channels_last: bool = True, amp: bool = False) -> np.ndarray:
    """Fused CAMs of one image.

    image: uint8 (H, W, 3). For each scale the image is resized (PIL bicubic, :func:`scaled_views`), run with and
    without h-flip (one batch of 2), the maps (of the selected classes only) are un-flipped and summed at the
    network's resolution, bilinearly resized back to (H, W) (align_corners False) and summed over scales; then each
    class map is divided by its maximum (+1e-5). ``classes`` (0-based foreground indices) selects the maps to
    return. Returns float32 (K, H, W) in [0, 1).

    Bilinear resizing is linear and commutes with the h-flip, so un-flipping and summing before resizing equals
    resizing each map first (up to float rounding, < 1e-6). ``channels_last`` runs the network on NHWC inputs
    (oneDNN / cuDNN fast paths, same values up to rounding; give the model the same layout with
    ``model.to(memory_format=torch.channels_last)`` to avoid per-call weight reorders). ``amp``: bf16 autocast on
    CUDA (ignored on the CPU; bf16 changes the maps by ~1e-2, so it is opt-in).
    """
    h, w = image.shape[:2]
    total = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(amp) and torch.device(device).type == "cuda")
    sel = None if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
    for x in scaled_views(image, scales, flip, device, channels_last=channels_last):
        with autocast:
            cams = cam_fn(x)
        if sel is not None:
            cams = cams.index_select(1, sel.to(cams.device))
        cams = cams.float()
        fused = cams[0:1] + cams[1:2].flip(-1) if flip else cams[0:1]
        fused = F.interpolate(fused.contiguous(), size=(h, w), mode="bilinear", align_corners=False)[0]
        total = fused if total is None else total + fused
    total = F.relu(total)
    total = total / (total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
    return total.cpu().numpy().astype(np.float32)
