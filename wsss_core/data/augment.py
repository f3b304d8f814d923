"""Image augmentation of the FSAE strong view (and of the views datasets' weak view), numpy in and out.

The kit of ``obeychoi0120/PixMatch`` ``data/dataset.py::ImageDataset`` (weak view: RandomResizeLong, h-flip,
ColorJitter, crop; strong view: the same geometry, a fresh ColorJitter, GaussianBlur and RandAugment) with the
photometric RandAugment ops of ``data/augmentation/randaugment.py::RandAugment`` / ``augment_list``. Paths below are
in that repository unless noted.

Works on HWC uint8 RGB images and takes an explicit ``numpy.random.Generator`` so a sample's views are a pure
function of the seed (same convention as :mod:`wsss_core.data.transforms`). The photometric ops (RandAugment, colour
jitter, blur) run PIL's and torchvision's own functions on a PIL image, as PixMatch does, so their pixels are the
reference's; only the random draws come from the generator.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .io import IGNORE_INDEX
from .transforms import crop_with_box, normalize, resize, to_tensor

# ---- augmentation defaults (final VOC script `script/voc_ppc0.sh` unless noted) ----
CROP_SIZE = 448                 # --crop_size 448
RESIZE_LONG = (448, 768)        # --resize_size 448 768 (util/imutils.py::RandomResizeLong)
JITTER = (0.3, 0.3, 0.3, 0.1)   # ColorJitter(b=0.3, c=0.3, s=0.3, h=0.1) (ImageDataset.__init__)
BLUR_KERNEL = 1                 # ImageDataset.__init__: k = 1 under seed 7, so the blur is an identity (PixMatch draws
                                # k = int(random() * 4.95), +1 if even, once per dataset: k in {1, 3, 5})
BLUR_SIGMA = (0.1, 2.0)         # GaussianBlur sigma ~ U(0.1, 2.0) per call (ImageDataset.__init__)
N_STRONG_AUGS = 5               # --n_strong_augs 5 (argparse default None: "n must be set")

# =====================================================================================================
# Geometry shared by both views (ClassificationDatasetWithSaliency.__getitem__ / __apply_transform_with_sal)
# =====================================================================================================

def sample_geometry(shape_hw: tuple[int, int], rng: np.random.Generator, crop: int = CROP_SIZE,
                    resize_long: tuple[int, int] | None = RESIZE_LONG, hflip_p: float = 0.5) -> dict[str, Any]:
    """Draw ``(target_long, hflip, box)`` for an image of size ``shape_hw``; both views reuse it (as PixMatch passes
    the weak view's ``(target_long, hflip, box)`` to the strong one).

    - ``target_long``: long side, integer uniform in ``resize_long`` (inclusive), or ``None`` (no resize).
    - ``hflip``: bool, p = ``hflip_p`` (0.5).
    - ``box``: ``(top, left, oy, ox)``: the resized image is placed at ``(oy, ox)`` in a zero canvas of size
      ``(max(h, crop), max(w, crop))`` and the ``crop`` x ``crop`` window at ``(top, left)`` is cut out
      (``util/imutils.py::random_crop_with_saliency``).
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
# Photometric ops on uint8 RGB: PIL's own ops (randaugment.py applies them to PIL images), not numpy copies
# =====================================================================================================

def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(img))


def _u8(pil_img: Image.Image) -> np.ndarray:
    """The PIL image as a new writable uint8 array."""
    return np.array(pil_img)


def _tvf():
    """``torchvision.transforms.functional`` (imported on first use)."""
    from torchvision.transforms import functional as tvf

    return tvf


def adjust_brightness(img: np.ndarray, v: float) -> np.ndarray:
    """``PIL.ImageEnhance.Brightness(img).enhance(v)`` (blend with black; ``randaugment.py::Brightness``, and
    torchvision's ``adjust_brightness`` on a PIL image)."""
    return _u8(ImageEnhance.Brightness(_pil(img)).enhance(float(v)))


def adjust_color(img: np.ndarray, v: float) -> np.ndarray:
    """``PIL.ImageEnhance.Color(img).enhance(v)`` (saturation: blend with the 'L' image; ``randaugment.py::Color``,
    torchvision's ``adjust_saturation`` on a PIL image)."""
    return _u8(ImageEnhance.Color(_pil(img)).enhance(float(v)))


def adjust_contrast(img: np.ndarray, v: float) -> np.ndarray:
    """``PIL.ImageEnhance.Contrast(img).enhance(v)`` (blend with the mean grey level; ``randaugment.py::Contrast``,
    torchvision's ``adjust_contrast`` on a PIL image)."""
    return _u8(ImageEnhance.Contrast(_pil(img)).enhance(float(v)))


def adjust_sharpness(img: np.ndarray, v: float) -> np.ndarray:
    """``PIL.ImageEnhance.Sharpness(img).enhance(v)`` (blend with the SMOOTH-filtered image;
    ``randaugment.py::Sharpness``)."""
    return _u8(ImageEnhance.Sharpness(_pil(img)).enhance(float(v)))


def adjust_hue(img: np.ndarray, v: float) -> np.ndarray:
    """torchvision ``adjust_hue(img, v)`` on a PIL image (``v`` in [-0.5, 0.5] turns): PIL HSV, H shifted by
    ``int(v * 255)`` mod 256, back to RGB (the hue term of ``transforms.ColorJitter`` in ``data/dataset.py``)."""
    return _u8(_tvf().adjust_hue(_pil(img), float(v)))


def autocontrast(img: np.ndarray, _v: float | None = None) -> np.ndarray:
    """``PIL.ImageOps.autocontrast(img)`` (per-channel min..max stretch, cutoff 0; ``randaugment.py::AutoContrast``)."""
    return _u8(ImageOps.autocontrast(_pil(img)))


def equalize(img: np.ndarray, _v: float | None = None) -> np.ndarray:
    """``PIL.ImageOps.equalize(img)`` (per-channel histogram equalisation with PIL's lookup table;
    ``randaugment.py::Equalize``)."""
    return _u8(ImageOps.equalize(_pil(img)))


def identity(img: np.ndarray, _v: float | None = None) -> np.ndarray:
    return img.copy()


def posterize(img: np.ndarray, v: float) -> np.ndarray:
    """``PIL.ImageOps.posterize(img, max(1, int(v)))``: keep the top bits of each channel (v in [4, 8];
    ``randaugment.py::Posterize``)."""
    return _u8(ImageOps.posterize(_pil(img), max(1, int(v))))


def solarize(img: np.ndarray, v: float) -> np.ndarray:
    """``PIL.ImageOps.solarize(img, v)``: invert pixels ``>= v`` (v in [0, 256]; 256 is an identity;
    ``randaugment.py::Solarize``)."""
    return _u8(ImageOps.solarize(_pil(img), v))


# (name, fn, lo, hi). Index order = randaugment.py::augment_list(use_geom_augs=False). lo/hi None: no magnitude (a value
# U(0, 1) is still drawn so the generator stream does not depend on which op was picked; the op ignores it).
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
    """Pick ``n`` ops *with replacement*, each with magnitude v ~ U(lo, hi) (``RandAugment.__call__``). Returns
    ``[(index, v)]``.

    Geometric ops (Shear/Translate/Rotate) are deliberately unsupported: they must stay off (PixMatch runs without
    ``--use_geom_augs``) because the pseudo labels are never geometrically inverted, so they would break pixel
    alignment.
    """
    if use_geom_augs:
        raise ValueError("geometric RandAugment ops must stay off (as in FSAE): pseudo labels are not inverted")
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


def color_jitter_torchvision(img: np.ndarray, rng: np.random.Generator,
                             jitter: tuple[float, float, float, float] | None = JITTER) -> np.ndarray:
    """torchvision ColorJitter(b, c, s, h) on uint8 RGB: factors b,c,s ~ U(1-x, 1+x), hue ~ U(-h, h), applied in a
    random order with torchvision's own functional ops on a PIL image (``adjust_brightness``, ``adjust_contrast``,
    ``adjust_saturation``, ``adjust_hue``; as ``transforms.ColorJitter.forward``). ``jitter=None`` returns a copy (and
    draws nothing). The order and factors come from ``rng`` (permutation, then b, c, s, h), not from torch's RNG.

    Reproduces ``obeychoi0120/PixMatch`` ``data/dataset.py::ImageDataset``:
    ``transforms.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)`` (both views). Unlike
    :func:`wsss_core.data.transforms.color_jitter_fixed_order` it has a hue term and a random order."""
    if jitter is None:
        return img.copy()
    b, c, s, h = jitter
    order = rng.permutation(4)
    fb = float(rng.uniform(max(0.0, 1 - b), 1 + b))
    fc = float(rng.uniform(max(0.0, 1 - c), 1 + c))
    fs = float(rng.uniform(max(0.0, 1 - s), 1 + s))
    fh = float(rng.uniform(-h, h))
    tvf = _tvf()
    out = _pil(img)
    for o in order:
        if o == 0 and b > 0:
            out = tvf.adjust_brightness(out, fb)
        elif o == 1 and c > 0:
            out = tvf.adjust_contrast(out, fc)
        elif o == 2 and s > 0:
            out = tvf.adjust_saturation(out, fs)
        elif o == 3 and h > 0:
            out = tvf.adjust_hue(out, fh)
    return _u8(out)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, kernel: int = BLUR_KERNEL,
                  sigma: tuple[float, float] = BLUR_SIGMA) -> np.ndarray:
    """``transforms.GaussianBlur(k, sigma)`` (``ImageDataset.__init__``) with sigma ~ U(sigma) drawn from ``rng``:
    torchvision's ``gaussian_blur(img, [k, k], [sg, sg])`` on a PIL image (reflect padding, float kernel, rounded back
    to uint8). sigma is always drawn; ``kernel <= 1`` is an identity (as torchvision's 1-tap kernel)."""
    sg = float(rng.uniform(*sigma))
    if kernel <= 1:
        return img.copy()
    if kernel % 2 == 0:
        raise ValueError("blur kernel must be odd")
    return _u8(_tvf().gaussian_blur(_pil(img), [int(kernel), int(kernel)], [sg, sg]))


def make_weak_strong_views(img: np.ndarray, rng: np.random.Generator, saliency: np.ndarray | None = None,
                           label: np.ndarray | None = None, crop: int = CROP_SIZE,
                           resize_long: tuple[int, int] | None = RESIZE_LONG, hflip_p: float = 0.5,
                           jitter: tuple[float, float, float, float] | None = JITTER,
                           blur_kernel: int = BLUR_KERNEL, blur_sigma: tuple[float, float] = BLUR_SIGMA,
                           n_strong_augs: int = N_STRONG_AUGS, strong: bool = True) -> dict[str, Any]:
    """Pixel-aligned weak/strong views of one image (``ClassificationDatasetWithSaliency.__getitem__``).
    ``strong=False`` builds the weak view only (the base method's data pipeline); the strong-view entries are then None.

    Inputs: ``img`` (H, W, 3) uint8 RGB; optional ``saliency`` (H, W) or (H, W, 3) uint8 and ``label``
    (H, W) uint8 (e.g. a GT map for debugging) that follow the weak view's geometry.

    Weak: resize-long -> h-flip -> ColorJitter -> crop (black pad). Strong: the *same* (target_long, hflip,
    box) -> a fresh ColorJitter -> crop -> GaussianBlur(k, sigma) -> RandAugment(n) (photometric only).

    Returns a dict with
      - ``weak_u8``, ``strong_u8``: (crop, crop, 3) uint8;
      - ``img_w``, ``img_s``: (3, crop, crop) float32 ImageNet-normalised tensors;
      - ``saliency``: (1, crop, crop) float32 in [0, 1] (channel mean / 255) or None;
      - ``label``: (crop, crop) uint8 with pad 255 or None;
      - ``geometry_w``, ``geometry_s``: the sampled geometry dicts (equal by construction);
      - ``ra_ops``: the sampled ``[(index, v)]`` (unused by the loss, as in PixMatch).
    """
    geom = sample_geometry(img.shape[:2], rng, crop=crop, resize_long=resize_long, hflip_p=hflip_p)
    base = resize_flip(img, geom)
    weak = crop_box(color_jitter_torchvision(base, rng, jitter), geom, pad=0)
    geom_s = dict(geom)  # reuse target_long, hflip and box (PixMatch's strong view)
    s_img, ra_ops = None, None
    if strong:
        s_img = crop_box(color_jitter_torchvision(base, rng, jitter), geom_s, pad=0)
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
