"""FSAE (Choi et al., WACV 2025) core operations: aligned weak/strong views, EMA teacher, pseudo labels, losses.

Everything here follows ``shared/specs/fsae.md`` (canonical reference: ``obeychoi0120/PixMatch``; the
separate-ring-term variant is from ``obeychoi0120/wseg@ssl``). Section numbers (``§n``) refer to that spec.
This module is pure math/augmentation; the method wrapper (``fsae.py``) composes it around a base method.

Augmentation works on numpy (HWC uint8 RGB images) and takes an explicit ``numpy.random.Generator`` so a
sample's views are a pure function of the seed (same convention as :mod:`wsss_core.data.transforms`).
The torch ops take their device/dtype from their inputs.

Logit layout: ``(B, C+1, h, w)`` CAM *logits* with an explicit background channel. ``bg_index=-1`` (bg last,
EPS/PPC layout, the default per §1/§3) or ``bg_index=0`` (SEAM layout, §8).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.io import IGNORE_INDEX
from ..data.transforms import crop_with_box, normalize, resize, to_tensor

# ---- hyperparameter defaults (§7, final VOC script `script/voc_ppc0.sh` unless noted) ----
CROP_SIZE = 448                 # --crop_size 448
RESIZE_LONG = (448, 768)        # --resize_size 448 768 (RandomResizeLong, §2.1.1)
JITTER = (0.3, 0.3, 0.3, 0.1)   # ColorJitter(b=0.3, c=0.3, s=0.3, h=0.1) (§2.1.3)
BLUR_KERNEL = 1                 # §2.4 / §10.2: k = 1 under seed 7, so the blur is an identity
BLUR_SIGMA = (0.1, 2.0)         # GaussianBlur sigma ~ U(0.1, 2.0) per call (§2.2.4)
N_STRONG_AUGS = 5               # --n_strong_augs 5 (argparse default None: "n must be set")
EMA_M = 0.999                   # --ema_m 0.999 (§5)
P_CUTOFF = 0.95                 # --p_cutoff 0.95 (§3.5)
BDRY_SIZE = 3                   # --bdry_size 3 in the VOC script (argparse default 0 = off)
BDRY_CUTOFF = 0.8               # --bdry_cutoff 0.8 (wseg@ssl default and VOC script; §10.10)
BDRY_LAMBDA = 1.0               # --bdry_lambda 1.0 (wseg@ssl scripts; §4)
PL_WEIGHT = 1.0                 # weight of L_pl, no ramp-up (§4)


# =====================================================================================================
# Geometry shared by both views (§2.1.1, §2.1.2, §2.1.4, §2.2.1)
# =====================================================================================================

def sample_geometry(shape_hw: tuple[int, int], rng: np.random.Generator, crop: int = CROP_SIZE,
                    resize_long: tuple[int, int] | None = RESIZE_LONG, hflip_p: float = 0.5) -> dict[str, Any]:
    """Draw ``(target_long, hflip, box)`` for an image of size ``shape_hw``; both views reuse it (§2.2.1).

    - ``target_long``: long side, integer uniform in ``resize_long`` (inclusive), or ``None`` (no resize).
    - ``hflip``: bool, p = ``hflip_p`` (0.5, §2.1.2).
    - ``box``: ``(top, left, oy, ox)``: the resized image is placed at ``(oy, ox)`` in a zero canvas of size
      ``(max(h, crop), max(w, crop))`` and the ``crop`` x ``crop`` window at ``(top, left)`` is cut out (§2.1.4).
    - ``size``: the resized ``(h, w)``; ``crop``: the crop side.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if resize_long is not None:
        target = int(rng.integers(int(resize_long[0]), int(resize_long[1]) + 1))
        s = target / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
    else:
        target = None
    hflip = bool(rng.random() < hflip_p)
    ch, cw = max(h, crop), max(w, crop)
    top = int(rng.integers(0, ch - crop + 1))
    left = int(rng.integers(0, cw - crop + 1))
    oy = int(rng.integers(0, ch - h + 1))
    ox = int(rng.integers(0, cw - w + 1))
    return {"target_long": target, "hflip": hflip, "box": (top, left, oy, ox), "size": (h, w), "crop": int(crop)}


def resize_flip(img: np.ndarray, geom: Mapping[str, Any], label: bool = False) -> np.ndarray:
    """Resize to ``geom['size']`` (bicubic, or nearest when ``label``) then h-flip if ``geom['hflip']``."""
    h, w = geom["size"]
    if img.shape[:2] != (h, w):
        out = resize(img, (h, w), label=label)
        img = out[..., None] if out.ndim < img.ndim else out  # cv2 drops a singleton channel axis
    if geom["hflip"]:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def crop_box(img: np.ndarray, geom: Mapping[str, Any], pad: float = 0) -> np.ndarray:
    """Cut the ``geom`` crop window out of an already resized/flipped array, padding with ``pad``."""
    return crop_with_box(img, geom["box"], geom["crop"], pad)


def apply_geometry(img: np.ndarray, geom: Mapping[str, Any], label: bool = False, pad: float = 0) -> np.ndarray:
    """Resize + flip + crop with ``geom``; labels use nearest interpolation and typically ``pad=255``."""
    return crop_box(resize_flip(img, geom, label=label), geom, pad=pad)


# =====================================================================================================
# Photometric ops on uint8 RGB (PIL semantics)
# =====================================================================================================

def _grey(img: np.ndarray) -> np.ndarray:
    """PIL 'L' conversion (ITU-R 601-2 luma), float64 (H, W, 1)."""
    x = img.astype(np.float64)
    return (x[..., 0:1] * 299 + x[..., 1:2] * 587 + x[..., 2:3] * 114) / 1000.0


def _blend(img: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance: ``degenerate + factor * (img - degenerate)``, clipped/rounded to uint8.

    ``factor == 1`` returns the image unchanged (bit-exact)."""
    x = img.astype(np.float64)
    out = degenerate + float(factor) * (x - degenerate)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def adjust_brightness(img: np.ndarray, v: float) -> np.ndarray:
    """Blend with black (factor ``v``)."""
    return _blend(img, np.zeros_like(img, dtype=np.float64), v)


def adjust_color(img: np.ndarray, v: float) -> np.ndarray:
    """Saturation: blend with the greyscale image."""
    return _blend(img, np.broadcast_to(_grey(img), img.shape), v)


def adjust_contrast(img: np.ndarray, v: float) -> np.ndarray:
    """Blend with a constant image at the (rounded) mean grey level."""
    return _blend(img, np.full(img.shape, float(np.floor(_grey(img).mean() + 0.5))), v)


def adjust_sharpness(img: np.ndarray, v: float) -> np.ndarray:
    """Blend with PIL's SMOOTH-filtered image (kernel [[1,1,1],[1,5,1],[1,1,1]]/13, border kept)."""
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0
    smooth = cv2.filter2D(img.astype(np.float64), -1, k, borderType=cv2.BORDER_REPLICATE)
    smooth = np.rint(smooth)
    if img.shape[0] > 2 and img.shape[1] > 2:
        degenerate = img.astype(np.float64).copy()
        degenerate[1:-1, 1:-1] = smooth[1:-1, 1:-1]
    else:
        degenerate = img.astype(np.float64)
    return _blend(img, degenerate, v)


def adjust_hue(img: np.ndarray, v: float) -> np.ndarray:
    """Rotate the hue by ``v`` turns (``v`` in [-0.5, 0.5]), torchvision semantics, via OpenCV HSV."""
    if v == 0:
        return img.copy()
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV_FULL)  # H in 0..255 for a full turn
    hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + int(round(v * 256))) % 256).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def autocontrast(img: np.ndarray, _v: float | None = None) -> np.ndarray:
    """Per-channel min..max stretch to 0..255 (PIL ``autocontrast`` with cutoff 0); flat channels unchanged."""
    out = img.copy()
    for c in range(img.shape[2]):
        ch = img[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi > lo:
            lut = np.clip(np.rint((np.arange(256) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
            out[..., c] = lut[ch]
    return out


def equalize(img: np.ndarray, _v: float | None = None) -> np.ndarray:
    """Per-channel histogram equalisation (OpenCV ``equalizeHist``)."""
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(img.shape[2])], axis=2)


def identity(img: np.ndarray, _v: float | None = None) -> np.ndarray:
    return img.copy()


def posterize(img: np.ndarray, v: float) -> np.ndarray:
    """Keep the top ``int(v)`` bits of each channel (v in [4, 8])."""
    bits = int(v)
    mask = (0xFF << (8 - bits)) & 0xFF
    return (img & np.uint8(mask)).astype(np.uint8)


def solarize(img: np.ndarray, v: float) -> np.ndarray:
    """Invert pixels ``>= v`` (threshold v in [0, 256]; 256 is an identity)."""
    return np.where(img >= v, 255 - img, img).astype(np.uint8)


# (name, fn, lo, hi). Index order = the table in §2.3. lo/hi None: no magnitude (a value U(0, 1) is still
# drawn so the generator stream does not depend on which op was picked; the op ignores it).
RANDAUGMENT_OPS: tuple[tuple[str, Any, float | None, float | None], ...] = (
    ("AutoContrast", autocontrast, None, None),
    ("Brightness", adjust_brightness, 0.05, 0.95),
    ("Color", adjust_color, 0.05, 0.95),
    ("Contrast", adjust_contrast, 0.05, 0.95),
    ("Equalize", equalize, None, None),
    ("Identity", identity, None, None),
    ("Posterize", posterize, 4.0, 8.0),
    ("Sharpness", adjust_sharpness, 0.05, 0.95),
    ("Solarize", solarize, 0.0, 256.0),
)


def op_range(index: int) -> tuple[float, float]:
    """Magnitude range of RandAugment op ``index`` ((0, 1) for magnitude-free ops)."""
    _, _, lo, hi = RANDAUGMENT_OPS[index]
    return (0.0, 1.0) if lo is None else (float(lo), float(hi))


def sample_randaugment(n: int, rng: np.random.Generator, use_geom_augs: bool = False) -> list[tuple[int, float]]:
    """Pick ``n`` ops *with replacement*, each with magnitude v ~ U(lo, hi) (§2.3). Returns ``[(index, v)]``.

    Geometric ops (Shear/Translate/Rotate) are deliberately unsupported: the spec (§2.3) says they must stay
    off because the pseudo labels are never geometrically inverted, so they would break pixel alignment.
    """
    if use_geom_augs:
        raise ValueError("geometric RandAugment ops must stay off (fsae.md §2.3): pseudo labels are not inverted")
    ops = []
    for _ in range(int(n)):
        idx = int(rng.integers(0, len(RANDAUGMENT_OPS)))
        lo, hi = op_range(idx)
        ops.append((idx, float(rng.uniform(lo, hi))))
    return ops


def apply_randaugment(img: np.ndarray, ops: Sequence[tuple[int, float]]) -> np.ndarray:
    """Apply sampled ``(index, v)`` ops in order to a uint8 RGB image (photometric only: geometry unchanged)."""
    for idx, v in ops:
        img = RANDAUGMENT_OPS[idx][1](img, v)
    return img


def color_jitter(img: np.ndarray, rng: np.random.Generator,
                 jitter: tuple[float, float, float, float] | None = JITTER) -> np.ndarray:
    """torchvision-style ColorJitter(b, c, s, h) on uint8 RGB: factors b,c,s ~ U(1-x, 1+x), hue ~ U(-h, h),
    applied in a random order. ``jitter=None`` returns a copy (and draws nothing)."""
    if jitter is None:
        return img.copy()
    b, c, s, h = jitter
    order = rng.permutation(4)
    fb = float(rng.uniform(max(0.0, 1 - b), 1 + b))
    fc = float(rng.uniform(max(0.0, 1 - c), 1 + c))
    fs = float(rng.uniform(max(0.0, 1 - s), 1 + s))
    fh = float(rng.uniform(-h, h))
    for o in order:
        if o == 0 and b > 0:
            img = adjust_brightness(img, fb)
        elif o == 1 and c > 0:
            img = adjust_contrast(img, fc)
        elif o == 2 and s > 0:
            img = adjust_color(img, fs)
        elif o == 3 and h > 0:
            img = adjust_hue(img, fh)
    return img


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, kernel: int = BLUR_KERNEL,
                  sigma: tuple[float, float] = BLUR_SIGMA) -> np.ndarray:
    """GaussianBlur(k, sigma ~ U(sigma)) (§2.2.4). sigma is always drawn; ``kernel <= 1`` is an identity."""
    sg = float(rng.uniform(*sigma))
    if kernel <= 1:
        return img.copy()
    if kernel % 2 == 0:
        raise ValueError("blur kernel must be odd")
    return cv2.GaussianBlur(img, (int(kernel), int(kernel)), sigmaX=sg, sigmaY=sg,
                            borderType=cv2.BORDER_REFLECT_101)


def blur_kernel_from_uniform(u: float) -> int:
    """The reference's kernel quirk (§2.4): ``int(u * 4.95)`` rounded up to odd, so k in {1, 3, 5}."""
    k = int(u * 4.95)
    return k + 1 if k % 2 == 0 else k


def make_weak_strong_views(img: np.ndarray, rng: np.random.Generator, saliency: np.ndarray | None = None,
                           label: np.ndarray | None = None, crop: int = CROP_SIZE,
                           resize_long: tuple[int, int] | None = RESIZE_LONG, hflip_p: float = 0.5,
                           jitter: tuple[float, float, float, float] | None = JITTER,
                           blur_kernel: int = BLUR_KERNEL, blur_sigma: tuple[float, float] = BLUR_SIGMA,
                           n_strong_augs: int = N_STRONG_AUGS, strong: bool = True) -> dict[str, Any]:
    """Pixel-aligned weak/strong views of one image (§2). ``strong=False`` builds the weak view only (the
    base method's data pipeline); the strong-view entries are then None.

    Inputs: ``img`` (H, W, 3) uint8 RGB; optional ``saliency`` (H, W) or (H, W, 3) uint8 and ``label``
    (H, W) uint8 (e.g. a GT map for debugging) that follow the weak view's geometry.

    Weak: resize-long -> h-flip -> ColorJitter -> crop (black pad). Strong: the *same* (target_long, hflip,
    box) -> a fresh ColorJitter -> crop -> GaussianBlur(k, sigma) -> RandAugment(n) (photometric only).

    Returns a dict with
      - ``weak_u8``, ``strong_u8``: (crop, crop, 3) uint8;
      - ``img_w``, ``img_s``: (3, crop, crop) float32 ImageNet-normalised tensors;
      - ``saliency``: (1, crop, crop) float32 in [0, 1] (channel mean / 255, §2.1.6) or None;
      - ``label``: (crop, crop) uint8 with pad 255 or None;
      - ``geometry_w``, ``geometry_s``: the sampled geometry dicts (equal by construction);
      - ``ra_ops``: the sampled ``[(index, v)]`` (unused by the loss, §2.3).
    """
    geom = sample_geometry(img.shape[:2], rng, crop=crop, resize_long=resize_long, hflip_p=hflip_p)
    base = resize_flip(img, geom)
    weak = crop_box(color_jitter(base, rng, jitter), geom, pad=0)
    geom_s = dict(geom)  # §2.2.1: reuse target_long, hflip and box
    s_img, ra_ops = None, None
    if strong:
        s_img = crop_box(color_jitter(base, rng, jitter), geom_s, pad=0)
        s_img = gaussian_blur(s_img, rng, kernel=blur_kernel, sigma=blur_sigma)
        ra_ops = sample_randaugment(n_strong_augs, rng)
        s_img = apply_randaugment(s_img, ra_ops)

    sal = None
    if saliency is not None:
        s = apply_geometry(saliency, geom, label=False, pad=0).astype(np.float32) / 255.0
        sal = torch.from_numpy(np.ascontiguousarray((s.mean(axis=2) if s.ndim == 3 else s)[None]))
    lab = apply_geometry(label, geom, label=True, pad=IGNORE_INDEX) if label is not None else None
    return {"weak_u8": weak, "strong_u8": s_img, "img_w": to_tensor(normalize(weak)),
            "img_s": to_tensor(normalize(s_img)) if strong else None, "saliency": sal, "label": lab,
            "geometry_w": geom, "geometry_s": geom_s, "ra_ops": ra_ops}


# =====================================================================================================
# EMA teacher (§5)
# =====================================================================================================

class EMAShadow:
    """The reference's in-module EMA (``module/ema.py``): a shadow copy of the parameters that had
    ``requires_grad`` when :meth:`register` ran (call it after ``model.train()`` / freezing).
    Buffers and frozen parameters are never registered: the teacher uses the live model's values for them.
    No warm-up (``mt_warmup`` is unused, §3): the shadow starts equal to the student initialisation.
    """

    def __init__(self, momentum: float = EMA_M):
        self.m = float(momentum)
        self.shadow: dict[str, torch.Tensor] = {}
        self.backup: dict[str, torch.Tensor] = {}

    def register(self, model: nn.Module) -> "EMAShadow":
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``shadow <- m * shadow + (1 - m) * theta`` for each registered parameter (after optimizer.step)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.m).add_(p.detach(), alpha=1.0 - self.m)

    @torch.no_grad()
    def apply_shadow(self, model: nn.Module) -> None:
        """Swap the shadow into ``param.data`` (student values kept in ``backup``)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.backup[n] = p.data
                p.data = self.shadow[n].clone()

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put the student values back (bit-identical: the original storage is reattached)."""
        for n, p in model.named_parameters():
            if n in self.backup:
                p.data = self.backup[n]
        self.backup = {}

    @contextlib.contextmanager
    def teacher(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.teacher(model): z_w = forward_cam(img_w)`` (§3.1/§3.7). The train/eval mode is left as
        is: the reference keeps the model in train mode, so dropout stays active (§10.5)."""
        self.apply_shadow(model)
        try:
            yield model
        finally:
            self.restore(model)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = float(state["m"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float = EMA_M,
                registered: set[str] | None = None) -> None:
    """Separate-module form of :class:`EMAShadow`, in place on ``teacher`` (same architecture as ``student``).

    For every *registered* parameter: ``t <- m * t + (1 - m) * s`` (§5). ``registered`` defaults to the
    student's parameters with ``requires_grad`` now. Everything else (frozen parameters and all buffers,
    e.g. BN running stats) is *copied* from the student: in the reference the teacher is the student module
    with only the shadow parameters swapped in, so those values are always the student's.
    """
    m = float(momentum)
    if registered is None:
        registered = {n for n, p in student.named_parameters() if p.requires_grad}
    t_params = dict(teacher.named_parameters())
    for n, s in student.named_parameters():
        t = t_params[n]
        if n in registered:
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        else:
            t.copy_(s.detach())
    t_bufs = dict(teacher.named_buffers())
    for n, b in student.named_buffers():
        t_bufs[n].copy_(b)


# =====================================================================================================
# Teacher pseudo labels (§3)
# =====================================================================================================

def _fg_channels(n_total: int, bg_index: int) -> slice:
    if bg_index in (-1, n_total - 1):
        return slice(0, n_total - 1)
    if bg_index == 0:
        return slice(1, n_total)
    raise ValueError("bg_index must be 0 or -1 (last)")


def mask_absent_classes(logits: torch.Tensor, labels: torch.Tensor, bg_index: int = -1,
                        absent: str = "zero") -> torch.Tensor:
    """Class masking (§3.3): fg logit channels x image labels; the bg channel is untouched.

    logits (B, C+1, h, w), labels (B, C) in {0, 1}. ``absent='zero'`` (reference, §10.3): absent classes get
    logit exactly 0; ``absent='neg_inf'``: the principled alternative (logit -inf). Differentiable."""
    n = logits.shape[1]
    fg = _fg_channels(n, bg_index)
    lab = labels.to(device=logits.device, dtype=logits.dtype)[:, :, None, None]
    if lab.shape[1] != n - 1:
        raise ValueError(f"labels have {lab.shape[1]} classes, logits {n - 1} fg channels")
    if absent == "zero":
        scale = torch.ones((logits.shape[0], n, 1, 1), device=logits.device, dtype=logits.dtype)
        scale[:, fg] = lab
        return logits * scale
    if absent == "neg_inf":
        add = torch.zeros((logits.shape[0], n, 1, 1), device=logits.device, dtype=logits.dtype)
        add[:, fg] = torch.where(lab > 0, torch.zeros_like(lab), torch.full_like(lab, float("-inf")))
        return logits + add
    raise ValueError("absent must be 'zero' or 'neg_inf'")


def confident_mask(probs: torch.Tensor, p_cutoff: float = P_CUTOFF) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """probs (B, K, h, w) softmax over bg+fg -> (conf, argmax, M_conf) each (B, h, w); ``M_conf = conf >= p``
    (inclusive, §3.5)."""
    conf, pseudo = probs.max(dim=1)
    return conf, pseudo, conf >= p_cutoff


def dilate(mask: torch.Tensor, size: int = BDRY_SIZE) -> torch.Tensor:
    """Binary dilation of (B, h, w) bool with ``ones(size x size)``, 1 iteration, equal to ``cv2.dilate``
    (anchor at ``size // 2``; outside the image counts as background)."""
    if size <= 1:
        return mask.clone()
    a = size // 2
    x = F.pad(mask[:, None].float(), (a, size - 1 - a, a, size - 1 - a), value=0.0)
    # cv2 dilation: dst(y, x) = max over kernel offsets (i - a) of src(y + i - a, x + j - a)
    return F.max_pool2d(x, kernel_size=size, stride=1)[:, 0] > 0.5


def boundary_ring(mask_fg: torch.Tensor, conf: torch.Tensor, size: int = BDRY_SIZE,
                  cutoff: float = BDRY_CUTOFF) -> torch.Tensor:
    """Spatial expansion (§3.6): ``R = (dilate(M_fg, size) - M_fg) AND (conf >= cutoff)``, (B, h, w) bool."""
    return dilate(mask_fg, size) & ~mask_fg & (conf >= cutoff)


@torch.no_grad()
def teacher_pseudo_labels(logits_w: torch.Tensor, labels: torch.Tensor, p_cutoff: float = P_CUTOFF,
                          bdry: bool = True, bdry_size: int = BDRY_SIZE, bdry_cutoff: float = BDRY_CUTOFF,
                          bg_index: int = -1, absent: str = "zero") -> dict[str, torch.Tensor]:
    """Hard pseudo labels from the teacher's weak-view CAM logits (§3.2-§3.6).

    logits_w (B, C+1, h, w) raw logits (no upsampling), labels (B, C). Returns (all (B, h, w)):
      ``probs`` (B, C+1, h, w), ``conf``, ``pseudo`` (argmax, may be bg or fg), ``mask_conf`` (conf >= p),
      ``mask_fg`` (max fg prob >= p), ``ring`` (R, empty when ``bdry`` is off), ``mask`` (PixMatch union
      ``M_conf | R``), and int64 targets with 255 elsewhere: ``target`` (union mask), ``target_conf``
      (M_conf only), ``target_ring`` (R only).
    """
    z = mask_absent_classes(logits_w.detach(), labels, bg_index=bg_index, absent=absent)
    probs = torch.softmax(z, dim=1)
    conf, pseudo, m_conf = confident_mask(probs, p_cutoff)
    fg = _fg_channels(probs.shape[1], bg_index)
    m_fg = probs[:, fg].max(dim=1).values >= p_cutoff
    ring = boundary_ring(m_fg, conf, bdry_size, bdry_cutoff) if bdry else torch.zeros_like(m_conf)
    mask = m_conf | ring

    def tgt(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m, pseudo, torch.full_like(pseudo, IGNORE_INDEX))

    return {"probs": probs, "conf": conf, "pseudo": pseudo, "mask_conf": m_conf, "mask_fg": m_fg,
            "ring": ring, "mask": mask, "target": tgt(mask), "target_conf": tgt(m_conf), "target_ring": tgt(ring)}


# =====================================================================================================
# Losses on the strong view (§4)
# =====================================================================================================

def pixel_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``L_pl = (1 / (B*h*w)) * sum_{valid} CE(logits[b, :, y, x], target[b, y, x])`` (§4, §10.6).

    logits (B, K, h, w), target (B, h, w) int64 with ``ignore_index`` outside the mask. Normalised by *all*
    pixels, so an empty mask gives exactly 0 (no NaN) with zero gradient."""
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not align")
    ce = F.cross_entropy(logits, target.to(device=logits.device, dtype=torch.long), ignore_index=ignore_index,
                         reduction="none")
    return ce.sum() / target.numel()


def fsae_loss(logits_s: torch.Tensor, labels: torch.Tensor, teacher: Mapping[str, torch.Tensor],
              variant: str = "union", bdry_lambda: float = BDRY_LAMBDA, pl_weight: float = PL_WEIGHT,
              bg_index: int = -1, absent: str = "zero") -> dict[str, torch.Tensor]:
    """The FSAE term on the student's strong-view CAM logits (B, C+1, h, w) (same fg x label masking, §4).

    - ``variant='union'`` (PixMatch, default per §10.1): ``L = pl_weight * L_pl(M_conf | R)``.
    - ``variant='separate'`` (wseg@ssl): ``L = pl_weight * (L_pl(M_conf) + bdry_lambda * L_pl(R))``; ring
      pixels that are also confident count twice, so with ``bdry_lambda = 1``
      ``separate = union + L_pl(R & M_conf)`` (equal when R and M_conf are disjoint).

    ``teacher`` is the dict of :func:`teacher_pseudo_labels`. The total training loss is
    ``L_sup + loss`` (L_pl weight 1, no ramp-up). Returns ``{"loss", "loss_pl", "loss_ring", "mask_ratio",
    "ring_ratio"}`` (``loss_ring`` is 0 for the union variant; it is already inside ``loss_pl``).
    """
    z = mask_absent_classes(logits_s, labels, bg_index=bg_index, absent=absent)
    zero = z.sum() * 0.0
    if variant == "union":
        l_pl = pixel_ce(z, teacher["target"])
        l_ring = zero
        loss = pl_weight * l_pl
    elif variant == "separate":
        l_pl = pixel_ce(z, teacher["target_conf"])
        l_ring = pixel_ce(z, teacher["target_ring"])
        loss = pl_weight * (l_pl + bdry_lambda * l_ring)
    else:
        raise ValueError("variant must be 'union' or 'separate'")
    return {"loss": loss, "loss_pl": l_pl, "loss_ring": l_ring,
            "mask_ratio": teacher["mask"].float().mean().detach(),
            "ring_ratio": teacher["ring"].float().mean().detach()}
