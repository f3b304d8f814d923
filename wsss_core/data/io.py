"""Reading and writing images and label maps, with errors that name the file.

Label maps are single-channel index PNGs (VOC convention: 0 = background, 1..C-1 classes,
255 = void). They are always read with PIL (palette PNGs yield indices), never with cv2.
"""

from __future__ import annotations

import io

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..store.atomic import atomic_path

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The bit-interleaved PASCAL VOC colour map, shape (n, 3) uint8; label 255 is painted (224, 224, 192)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[label] = (r, g, b)
    if n > 255:
        pal[255] = (224, 224, 192)
    return pal


_PALETTE_FLAT = voc_palette(256).reshape(-1).tolist()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image as uint8 (H, W, 3). Raises DataError naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for truncated/corrupt files
        raise DataError(f"corrupt or unreadable image: {path} ({type(exc).__name__}: {exc}). "
                        "Replace the file with a valid JPEG/PNG or remove its id from the lists.") from exc
    return np.ascontiguousarray(arr)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image without decoding all pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:
        raise DataError(f"corrupt or unreadable image: {path} ({exc})") from exc
    return h, w


def validate_label_map(arr: np.ndarray, n_classes: int, source: str = "label map") -> np.ndarray:
    """Check that every value is in 0..n_classes-1 or 255; raise DataError naming ``source`` otherwise."""
    vals = np.unique(arr)
    bad = vals[(vals >= n_classes) & (vals != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"{source}: values {bad.tolist()[:10]} are outside 0..{n_classes - 1} and 255 "
                        f"(found {vals.tolist()[:30]}). A colour (RGB) mask or a mask of another dataset? "
                        "Masks must be single-channel index PNGs.")
    return arr


def read_label_png(path: str | os.PathLike, n_classes: int | None = None) -> np.ndarray:
    """Read an index PNG as uint8 (H, W). With ``n_classes``, validate its values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label mask not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"label mask {path} has PIL mode {im.mode!r}; expected a single-channel index PNG "
                                "(mode P or L), not a colour image")
            arr = np.array(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"corrupt or unreadable label mask: {path} ({type(exc).__name__}: {exc})") from exc
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"label mask {path} has values outside 0..255")
        arr = arr.astype(np.uint8)
    if n_classes is not None:
        validate_label_map(arr, n_classes, str(path))
    return arr


def label_png_bytes(labels: np.ndarray) -> bytes:
    """A uint8 (H, W) label map encoded as a VOC-palette ("P" mode) PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(_PALETTE_FLAT)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Atomically write a uint8 (H, W) label map as a VOC-palette ("P" mode) PNG."""
    data = label_png_bytes(labels)
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(data)


def write_image(path: str | os.PathLike, img: np.ndarray, quality: int = 92) -> None:
    """Atomically write a uint8 (H, W, 3) RGB image; the format follows the suffix of ``path``."""
    path = Path(path)
    im = Image.fromarray(np.asarray(img, dtype=np.uint8), mode="RGB")
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        im.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))


def colorize(labels: np.ndarray) -> np.ndarray:
    """uint8 (H, W) labels -> uint8 (H, W, 3) VOC colours."""
    return voc_palette(256)[np.asarray(labels, dtype=np.uint8)]
