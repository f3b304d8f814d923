"""Image/label augmentation on numpy arrays (HWC uint8 images, HW uint8 labels), seeded explicitly.

Every random choice takes a ``numpy.random.Generator`` so a sample's augmentation is a pure function
of (seed, epoch, index): resumed training sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (H, W, 3) ImageNet-normalised."""
    return (img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """float (H, W, 3) -> torch float32 (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def resize(img: np.ndarray, size_hw: tuple[int, int], label: bool = False) -> np.ndarray:
    """Resize to (H, W): bicubic for images, nearest for label maps."""
    h, w = size_hw
    interp = cv2.INTER_NEAREST if label else cv2.INTER_CUBIC
    out = cv2.resize(img, (int(w), int(h)), interpolation=interp)
    return np.clip(out, 0, 255).astype(img.dtype) if not label and img.dtype == np.uint8 else out


def resize_pil_bicubic(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 (H, W) or (H, W, 3) image to ``size_hw`` = (H', W') with PIL's bicubic filter
    (``Image.fromarray(img).resize((W', H'), Image.BICUBIC)``), returned as a new writable array; the image itself
    when the size is unchanged (the shortcut of ``Image.resize`` and of ``chenqi1126/SIPE``
    ``tool/imutils.py::pil_resize``).

    Unlike ``cv2.INTER_CUBIC`` (:func:`resize`), PIL widens the filter support by the shrink factor, i.e. it
    antialiases when shrinking, and it uses its own fixed-point rounding: the two differ by tens of grey levels at a
    0.5 scale. The multi-scale CAM views of the references are made this way
    (:func:`wsss_core.methods.inference.scaled_views`)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if img.shape[:2] == (h, w):
        return img
    return np.array(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BICUBIC))


def random_resize_long(img: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    """Resize so that the long side is uniform in [lo, hi] (integers), keeping the aspect ratio."""
    target = int(rng.integers(int(lo), int(hi) + 1))
    h, w = img.shape[:2]
    s = target / max(h, w)
    return resize(img, (max(1, round(h * s)), max(1, round(w * s))))


def color_jitter_fixed_order(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3,
                             contrast: float = 0.3, saturation: float = 0.3) -> np.ndarray:
    """Random brightness/contrast/saturation (factors in [1-x, 1+x]) on uint8 RGB, always in that order, no hue,
    in float32 (contrast about the image mean, saturation about the per-pixel channel mean), clipped to uint8.

    The classic crops' jitter (classifier and AffinityNet training), standing in for ``jiwoon-ahn/psa``
    ``train_cls.py`` / ``train_aff.py``: ``transforms.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3,
    hue=0.1)`` without its hue term and random order. The views' torchvision-exact jitter is
    :func:`wsss_core.data.augment.color_jitter_torchvision`."""
    x = img.astype(np.float32)
    x *= rng.uniform(1 - brightness, 1 + brightness)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
    return np.clip(x, 0, 255).astype(np.uint8)


def crop_with_box(a: np.ndarray, box: tuple[int, int, int, int], crop: int, pad: float) -> np.ndarray:
    """Place ``a`` at offset (oy, ox) on a ``pad``-filled canvas of at least crop x crop, then cut the window at
    (top, left). ``box`` = (top, left, oy, ox)."""
    top, left, oy, ox = box
    h, w = a.shape[:2]
    canvas = np.full((max(h, crop), max(w, crop)) + a.shape[2:], pad, dtype=a.dtype)
    canvas[oy:oy + h, ox:ox + w] = a
    return np.ascontiguousarray(canvas[top:top + crop, left:left + crop])


def random_crop(arrays: list[np.ndarray], pads: list[float], crop: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Crop the same random ``crop`` x ``crop`` window out of each array, padding with ``pads`` if smaller."""
    h, w = arrays[0].shape[:2]
    ch, cw = max(h, crop), max(w, crop)
    top = int(rng.integers(0, ch - crop + 1))
    left = int(rng.integers(0, cw - crop + 1))
    # where the (possibly padded) array sits inside the canvas
    oy = int(rng.integers(0, ch - h + 1))
    ox = int(rng.integers(0, cw - w + 1))
    return [crop_with_box(a, (top, left, oy, ox), crop, pad) for a, pad in zip(arrays, pads)]
