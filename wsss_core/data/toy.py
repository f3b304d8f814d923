"""A small, procedurally generated PASCAL-VOC-style dataset that poses the real WSSS problem.

Why this design
---------------
Weakly-supervised semantic segmentation (WSSS) trains a segmenter from *image-level* labels only.
Its central difficulty is that a classifier trained on image labels looks only at the most
*discriminative* region of an object (a dog's face, not its body), so its class activation map
(CAM) covers a small part of the object; WSSS methods (CAM expansion, affinity / random-walk
propagation, dense CRF, ...) exist to grow that seed to the whole object.

The toy data reproduces exactly that situation at a size that trains on 2 CPU cores:

* Every object consists of a large **body** and a small **class-distinctive part**.
  The body's shape, size, texture and colour distribution are drawn from one family *shared by all
  classes* (greyish-blue oriented stripes with random orientation, period, phase, shading and noise,
  inside a random smooth blob with a slightly darker rim). The body therefore carries no class
  information, and a classifier trained on image labels must look at the part.
* The **part** is a small disc (about 10-18 % of the object area) inside the body whose colour and
  pattern are unique to the class (red with white dots, green checker, yellow/black stripes,
  magenta rings, cyan with a dark grid). A plain CAM lights up the part and misses the body; the
  ground-truth mask labels body + part, so how much of the body a method recovers is measurable.
* The body is still separable from the background (cool blue-grey striped texture with a dark rim
  against warm, brownish clutter), so CRF / affinity methods *can* in principle expand to it.
* The background is cluttered: smooth multi-colour noise in warm earth tones plus random
  distractor shapes (ellipses, polygons, bars, striped or blotchy patches) whose colours never reuse
  the saturated class-part colours, so clutter is not confusable with any class.
* Up to ``max_objects`` objects per image (at least one), at varied scales (diameter roughly
  25-70 % of the image), later objects occluding earlier ones (placements that would hide most of an
  earlier object's part are re-drawn, so every labelled object keeps a visible part).
* Like VOC, masks carry a ``border``-pixel band of 255 (void) along every object instance boundary
  (object/background and object/object), and images get mild per-image brightness/contrast/colour
  variation, sensor noise and JPEG compression.

Layout written by :func:`make_toy_dataset` (VOC 2012 style)::

    root/JPEGImages/toy_000000.jpg           RGB uint8, (image_size, image_size, 3)
    root/SegmentationClass/toy_000000.png    palette PNG, uint8 (image_size, image_size),
                                             values 0..n_classes and 255
    root/ImageSets/Segmentation/{train_aug,train,val}.txt
    root/classes.txt                         one class name per line, background first
    root/toy_dataset.json                    generator parameters, counts, "synthetic" note
    root/Parts/toy_000000.png                only with debug_parts=True: 1 = visible part pixel

Everything is deterministic given the arguments: image ``i`` is rendered with its own generator
``numpy.random.default_rng(numpy.random.SeedSequence(seed).spawn(n)[i])``, so the same arguments
give byte-identical files. The folder is built next to ``root`` and renamed into place at the end,
so an interrupted run never leaves a ``root`` that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from ..store.atomic import write_json, write_text
from .io import IGNORE_INDEX, write_image, write_label_png

__all__ = ["TOY_CLASSES", "make_toy_dataset", "render_sample"]

#: Class names; the index is the label value in the masks. 0 is background.
TOY_CLASSES: tuple[str, ...] = (
    "background",
    "red_dots",
    "green_checker",
    "yellow_stripes",
    "magenta_rings",
    "cyan_grid",
)

_MAX_CLASSES = len(TOY_CLASSES) - 1

# Class-part colours (float RGB in 0..1): (main colour, pattern colour). Saturated hues that the
# warm, desaturated background palette never produces.
_PART_COLOURS = {
    1: ((0.88, 0.08, 0.08), (1.00, 0.90, 0.90)),  # red with white dots
    2: ((0.10, 0.78, 0.15), (0.02, 0.32, 0.05)),  # green checker (light/dark green)
    3: ((0.97, 0.88, 0.08), (0.10, 0.08, 0.00)),  # yellow / black stripes
    4: ((0.88, 0.10, 0.82), (1.00, 0.72, 1.00)),  # magenta with pale rings
    5: ((0.08, 0.85, 0.90), (0.00, 0.18, 0.35)),  # cyan with dark blue grid
}

# Shared body colour family: stripes between a dark and a light greyish blue.
_BODY_DARK = np.array([0.28, 0.34, 0.48], dtype=np.float32)
_BODY_LIGHT = np.array([0.60, 0.67, 0.80], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# small vectorised helpers
# --------------------------------------------------------------------------------------------

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB. h in degrees, s, v in 0..1 (equal shapes (...)) -> (..., 3) float32."""
    h, s, v = (np.asarray(x, dtype=np.float64)[..., None] for x in (h, s, v))
    k = (np.array([5.0, 3.0, 1.0]) + h / 60.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _warm_colours(rng: np.random.Generator, n: int, sat_max: float = 0.5) -> np.ndarray:
    """(n, 3) float32 warm earth tones (hue 12-40 deg, low/medium saturation): clutter colours."""
    h = rng.uniform(12.0, 40.0, n)
    s = rng.uniform(0.15, sat_max, n)
    v = rng.uniform(0.22, 0.88, n)
    return _hsv_to_rgb(h, s, v)


def _neutral_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) float32 greys with a faint warm tint (hue 20-45 deg, saturation < 0.1)."""
    return _hsv_to_rgb(rng.uniform(20.0, 45.0, n), rng.uniform(0.0, 0.1, n), rng.uniform(0.15, 0.95, n))


def _upsample(low: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Separable bilinear upsampling of (h, w, c) float32 to (out_h, out_w, c), pure numpy."""
    h, w = low.shape[:2]
    ys = np.linspace(0.0, h - 1.0, out_h)
    xs = np.linspace(0.0, w - 1.0, out_w)
    y0 = np.minimum(np.floor(ys).astype(int), h - 2)
    x0 = np.minimum(np.floor(xs).astype(int), w - 2)
    fy = (ys - y0)[:, None, None].astype(np.float32)
    fx = (xs - x0)[None, :, None].astype(np.float32)
    rows = low[y0] * (1.0 - fy) + low[y0 + 1] * fy  # (out_h, w, c)
    return (rows[:, x0] * (1.0 - fx) + rows[:, x0 + 1] * fx).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """Smooth value noise in 0..1, shape (*shape, channels) float32; ``cells`` knots across the larger side."""
    h, w = shape
    ch = max(2, int(round(cells * h / max(h, w))) + 1)
    cw = max(2, int(round(cells * w / max(h, w))) + 1)
    return _upsample(rng.random((ch, cw, channels), dtype=np.float32), h, w)


def _bbox(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The tight bounding box of a bool (H, W) mask as a pair of slices, or None if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _box(size: int, cy: float, cx: float, ext: float) -> tuple[slice, slice] | None:
    """Slices of the square [cy-ext, cy+ext] x [cx-ext, cx+ext] clipped to the image, or None if outside."""
    y0, y1 = max(0, int(np.floor(cy - ext))), min(size, int(np.ceil(cy + ext)) + 1)
    x0, x1 = max(0, int(np.floor(cx - ext))), min(size, int(np.ceil(cx + ext)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float, aspect: float,
          angle: float, harm: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Bool mask (shape of ``yy``) of a wobbly ellipse: r(theta) = radius * (1 + sum_k harm_k cos(k theta + phi_k)).

    ``yy``/``xx`` are float32 pixel-coordinate grids (possibly a crop of the image grid).
    """
    dy, dx = yy - np.float32(cy), xx - np.float32(cx)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * ca + dy * sa) / np.float32(aspect)
    v = (dy * ca - dx * sa) * np.float32(aspect)
    th = np.arctan2(v, u)
    wobble = np.ones_like(th)
    for k, (h, ph) in enumerate(zip(harm.tolist(), phases.tolist()), start=2):
        wobble += np.float32(h) * np.cos(th * np.float32(k) + np.float32(ph))
    rad = np.float32(radius) * wobble
    return u * u + v * v <= rad * rad


def _blob_full(size: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float, aspect: float,
               angle: float, harm: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """:func:`_blob` on the whole (size, size) image, evaluated only inside its bounding square."""
    mask = np.zeros((size, size), dtype=bool)
    box = _box(size, cy, cx, radius * (1.0 + float(np.abs(harm).sum())) * max(aspect, 1.0 / aspect) + 1.0)
    if box is not None:
        mask[box] = _blob(yy[box], xx[box], cy, cx, radius, aspect, angle, harm, phases)
    return mask


def _stripes(yy: np.ndarray, xx: np.ndarray, angle: float, period: float, phase: float) -> np.ndarray:
    """Soft oriented stripes in 0..1, shape of ``yy``, float32."""
    w = np.float32(2.0 * np.pi / period)
    t = xx * np.float32(np.cos(angle) * w) + yy * np.float32(np.sin(angle) * w) + np.float32(phase)
    return np.float32(0.5) + np.float32(0.5) * np.sin(t)


def _paint(canvas: np.ndarray, mask: np.ndarray, box: tuple[slice, slice], fill: np.ndarray) -> None:
    """``canvas[box][mask[box]] = fill[mask[box]]``; ``fill`` is (h, w, 3) for the box, or (3,)."""
    sub = mask[box]
    region = canvas[box]
    region[sub] = fill if fill.ndim == 1 else fill[sub]


# --------------------------------------------------------------------------------------------
# rendering of one sample
# --------------------------------------------------------------------------------------------

def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Cluttered background, (size, size, 3) float32 in about 0..1 (no saturated class-part colours)."""
    # Smooth blend of 3 warm colours + low-contrast mottling.
    cols = _warm_colours(rng, 3)
    weights = _smooth_noise(rng, (size, size), int(rng.integers(3, 7)), 3) ** 2 + np.float32(1e-3)
    weights /= weights.sum(-1, keepdims=True)
    img = weights @ cols
    img += (_smooth_noise(rng, (size, size), int(rng.integers(10, 20)), 1) - np.float32(0.5)) * np.float32(0.12)

    # Distractor shapes (background, label 0).
    n_distractors = int(rng.integers(4, 10))
    for _ in range(n_distractors):
        kind = int(rng.integers(0, 4))
        cy, cx = rng.uniform(-0.1, 1.1, 2) * size
        extent = rng.uniform(0.08, 0.38) * size
        a = rng.uniform(0, np.pi)
        if kind == 0:  # ellipse / blob
            aspect = rng.uniform(0.5, 2.0)
            mask = _blob_full(size, yy, xx, cy, cx, extent / 2, aspect, a,
                              rng.uniform(0.0, 0.08, 2), rng.uniform(0, 2 * np.pi, 2))
        elif kind == 1:  # convex-ish polygon
            n_v = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n_v))
            rad = extent / 2 * rng.uniform(0.6, 1.2, n_v)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], -1)
            m8 = np.zeros((size, size), np.uint8)
            cv2.fillPoly(m8, [np.round(pts).astype(np.int32)], 1)
            mask = m8.astype(bool)
        else:  # bar (kind 2) or rectangle (kind 3)
            half_len = extent if kind == 2 else extent / 2
            half_wid = rng.uniform(1.0, 0.06 * size + 1.0) if kind == 2 else extent / 2 * rng.uniform(0.3, 1.0)
            mask = np.zeros((size, size), dtype=bool)
            box = _box(size, cy, cx, np.hypot(half_len, half_wid) + 1.0)
            if box is not None:
                dy, dx = yy[box] - np.float32(cy), xx[box] - np.float32(cx)
                ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
                mask[box] = (np.abs(dx * ca + dy * sa) <= half_len) & (np.abs(dy * ca - dx * sa) <= half_wid)
        box = _bbox(mask)
        if box is None:
            continue
        h, w = mask[box].shape
        style = int(rng.integers(0, 4))
        col = (_neutral_colours(rng, 1) if rng.random() < 0.25 else _warm_colours(rng, 1))[0]
        if style == 0:  # flat + grain
            fill = col + (rng.random((h, w, 1), dtype=np.float32) - np.float32(0.5)) * np.float32(0.08)
        elif style == 1:  # warm stripes (so stripes alone do not identify an object body)
            col2 = _warm_colours(rng, 1)[0]
            s = _stripes(yy[box], xx[box], rng.uniform(0, np.pi), rng.uniform(3.0, 8.0),
                         rng.uniform(0, 2 * np.pi))[..., None]
            fill = col * (1 - s) + col2 * s
        elif style == 2:  # blotchy two-tone
            col2 = _warm_colours(rng, 1)[0]
            s = _smooth_noise(rng, (h, w), int(rng.integers(3, 8)), 1)
            fill = col * (1 - s) + col2 * s
        else:  # shaded
            g = _smooth_noise(rng, (h, w), 2, 1)
            fill = col * (np.float32(0.7) + np.float32(0.6) * g)
        _paint(img, mask, box, fill)
    return img


def _body_texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The class-agnostic body texture on the grid ``yy``/``xx`` (h, w): (h, w, 3) float32.

    Greyish-blue oriented stripes (random orientation, period, phase, small colour jitter) with smooth
    shading and pixel noise; drawn from the same distribution for every class.
    """
    h, w = yy.shape
    jitter = rng.normal(0.0, 0.03, 3).astype(np.float32)
    dark = _BODY_DARK + jitter
    light = _BODY_LIGHT + jitter + rng.normal(0.0, 0.02, 3).astype(np.float32)
    s = _stripes(yy, xx, rng.uniform(0, np.pi), rng.uniform(3.5, 7.0), rng.uniform(0, 2 * np.pi))[..., None]
    tex = dark * (1.0 - s) + light * s
    shade = np.float32(0.85) + np.float32(0.3) * _smooth_noise(rng, (h, w), 3, 1)
    return tex * shade + rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(0.025)


def _part_texture(rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray,
                  cy: float, cx: float, radius: float) -> np.ndarray:
    """The class-distinctive part texture of class ``cls`` centred at (cy, cx): (h, w, 3) float32 for grid (h, w)."""
    main, pat = (np.asarray(c, dtype=np.float32) for c in _PART_COLOURS[cls])
    jit = rng.normal(0.0, 0.03, 3).astype(np.float32)
    main, pat = main + jit, pat + jit
    a = rng.uniform(0, np.pi)
    dy, dx = yy - np.float32(cy), xx - np.float32(cx)
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    u = dx * ca + dy * sa
    v = dy * ca - dx * sa
    period = np.float32(np.clip(radius / 2.2, 2.6, 5.0))
    if cls == 1:  # dots
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        p = (du * du + dv * dv) <= (period * np.float32(0.3)) ** 2
    elif cls == 2:  # checker
        p = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif cls == 3:  # stripes
        p = (v % period) < period / 2
    elif cls == 4:  # concentric rings
        p = (np.hypot(u, v) % period) < period * np.float32(0.4)
    else:  # grid
        p = ((u % period) < 1.0) | ((v % period) < 1.0)
    tex = np.where(p[..., None], pat, main)
    return tex + rng.standard_normal((*yy.shape, 1), dtype=np.float32) * np.float32(0.02)


def _boundary_band(instances: np.ndarray, border: int) -> np.ndarray:
    """Bool (H, W): pixels whose (2*border+1)^2 window contains more than one instance id."""
    if border <= 0:
        return np.zeros(instances.shape, dtype=bool)
    kernel = np.ones((2 * border + 1, 2 * border + 1), np.uint8)
    inst = instances.astype(np.uint8)
    hi = cv2.dilate(inst, kernel, borderType=cv2.BORDER_REPLICATE)
    lo = cv2.erode(inst, kernel, borderType=cv2.BORDER_REPLICATE)
    return hi != lo


def render_sample(rng: np.random.Generator, image_size: int = 96, *, n_classes: int = 5, max_objects: int = 3,
                  border: int = 1, return_instances: bool = False):
    """Render one toy sample (before JPEG compression).

    Args:
        rng: the generator to draw from (the sample is a pure function of its state).
        image_size: side S of the square image.
        n_classes: number of object classes C (1..5); labels are 1..C, 0 is background.
        max_objects: at most this many objects (at least one is always present).
        border: width of the 255 band on each side of every instance boundary (0 = none).
        return_instances: also return the instance map.

    Returns:
        ``(image, mask, part_mask)``: ``image`` uint8 (S, S, 3) RGB; ``mask`` uint8 (S, S) with values
        0..C and 255 on instance boundaries; ``part_mask`` bool (S, S), True on the visible
        class-distinctive part pixels (bodies are ``mask in 1..C and not part_mask``).
        With ``return_instances`` a fourth item, ``instances`` uint8 (S, S): 0 background,
        k = k-th placed object (visible pixels, before the 255 band).
    """
    if not 1 <= n_classes <= _MAX_CLASSES:
        raise ValueError(f"n_classes must be in 1..{_MAX_CLASSES}, got {n_classes}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    size = int(image_size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    img = _background(rng, size, yy, xx)

    instances = np.zeros((size, size), np.uint8)
    objects: list[dict] = []  # accepted objects: class, full part mask
    n_obj = int(rng.integers(1, max_objects + 1))
    for _ in range(n_obj):
        for _attempt in range(12 if objects else 500):  # the first object must succeed
            diameter = rng.uniform(0.25, 0.70) * size
            aspect = rng.uniform(0.7, 1.4)
            radius = diameter / 2.0 / max(aspect, 1.0 / aspect) ** 0.5
            margin = 0.2 * radius
            cy, cx = rng.uniform(radius - margin, size - radius + margin, 2)
            harm = rng.uniform(0.0, 0.12, 3)
            phases = rng.uniform(0, 2 * np.pi, 3)
            body = _blob_full(size, yy, xx, cy, cx, radius, aspect, rng.uniform(0, np.pi), harm, phases)
            area = int(body.sum())
            if area < 0.03 * size * size:
                continue
            # Part: a disc of ~10-18 % of the object area, fully inside the visible body.
            part_r = float(np.sqrt(rng.uniform(0.10, 0.18) * area / np.pi))
            dist = cv2.distanceTransform(np.pad(body, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
            cand = np.flatnonzero(dist.ravel() >= part_r + 1.0)
            if cand.size == 0:
                continue
            pos = int(cand[rng.integers(0, cand.size)])
            py, px = divmod(pos, size)
            part = np.zeros((size, size), dtype=bool)
            pbox = _box(size, py, px, part_r + 1.0)
            part[pbox] = ((yy[pbox] - py) ** 2 + (xx[pbox] - px) ** 2) <= part_r ** 2
            obj = body | part
            new_inst = instances.copy()
            new_inst[obj] = len(objects) + 1
            # Keep earlier objects identifiable: most of each earlier part and some body visible.
            ok = all(
                (o["part"] & (new_inst == j + 1)).sum() >= 0.7 * o["part"].sum()
                and (new_inst == j + 1).sum() >= 1.6 * o["part"].sum()
                for j, o in enumerate(objects)
            )
            if not ok:
                continue
            cls = int(rng.integers(1, n_classes + 1))
            # Paint body (shared family) with a darker rim, then the class part.
            bbox = _bbox(body)
            tex = _body_texture(rng, yy[bbox], xx[bbox])
            tex[(dist[bbox] < 1.6) & body[bbox]] *= np.float32(0.55)  # darker rim: a visible edge
            _paint(img, body, bbox, tex)
            _paint(img, part, pbox, _part_texture(rng, cls, yy[pbox], xx[pbox], py, px, part_r))
            instances = new_inst
            objects.append({"cls": cls, "part": part})
            break

    if not objects:  # pragma: no cover - 500 failed draws of an unoccluded object do not happen
        raise RuntimeError("toy renderer could not place any object")
    cls_of = np.zeros(len(objects) + 1, np.uint8)
    for j, o in enumerate(objects):
        cls_of[j + 1] = o["cls"]
    mask = cls_of[instances]
    part_mask = np.zeros((size, size), bool)
    for j, o in enumerate(objects):
        part_mask |= o["part"] & (instances == j + 1)
    mask[_boundary_band(instances, border)] = IGNORE_INDEX

    # Mild per-image photometric variation and sensor noise.
    gain = rng.uniform(0.85, 1.15)
    contrast = rng.uniform(0.85, 1.15)
    tint = rng.normal(0.0, 0.02, 3).astype(np.float32)
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * contrast + mean * gain + tint
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.015)
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    if return_instances:
        return image, mask, part_mask, instances
    return image, mask, part_mask


# --------------------------------------------------------------------------------------------
# the dataset folder
# --------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Remove ``<root>.tmp-<pid>`` / ``<root>.old-<pid>`` folders of this or of dead processes."""
    if not root.parent.is_dir():
        return
    for p in root.parent.iterdir():
        for tag in (".tmp-", ".old-"):
            prefix = root.name + tag
            if p.name.startswith(prefix) and p.is_dir():
                suffix = p.name[len(prefix):]
                if suffix.isdigit() and (int(suffix) == os.getpid() or not _pid_alive(int(suffix))):
                    shutil.rmtree(p, ignore_errors=True)


def make_toy_dataset(root, *, seed: int = 0, image_size: int = 96, n_train_aug: int = 240, n_train: int = 60,
                     n_val: int = 60, n_classes: int = 5, max_objects: int = 3, border: int = 1,
                     jpeg_quality: int = 92, debug_parts: bool = False) -> dict:
    """Generate the toy VOC-format dataset into ``root`` (atomically) and return a summary.

    Images ``toy_000000 .. toy_{n_train_aug-1}`` form ``train_aug`` (``train`` = its first ``n_train``
    ids); the next ``n_val`` ids form ``val``. See the module docstring for the layout and content.

    Returns a dict: ``root``, ``classes`` (names, background first), ``splits`` (split -> count),
    ``class_image_counts`` (split -> {class name -> number of images containing it}),
    ``n_objects`` (split -> number of object instances in train_aug/val).
    """
    if n_train_aug < 1 or n_val < 0 or not 0 <= n_train <= n_train_aug:
        raise ValueError(f"need n_train_aug >= 1, n_val >= 0 and 0 <= n_train <= n_train_aug "
                         f"(got n_train_aug={n_train_aug}, n_train={n_train}, n_val={n_val})")
    if not 1 <= n_classes <= _MAX_CLASSES:
        raise ValueError(f"n_classes must be in 1..{_MAX_CLASSES}, got {n_classes}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")

    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    classes = TOY_CLASSES[: n_classes + 1]
    n_total = n_train_aug + n_val
    ids = [f"toy_{i:06d}" for i in range(n_total)]
    splits = {"train_aug": ids[:n_train_aug], "train": ids[:n_train], "val": ids[n_train_aug:]}

    try:
        (tmp / "JPEGImages").mkdir(parents=True)
        (tmp / "SegmentationClass").mkdir()
        (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)
        present = np.zeros((n_total, n_classes + 1), dtype=bool)
        n_inst = np.zeros(n_total, dtype=np.int64)
        for i, (img_id, child) in enumerate(zip(ids, np.random.SeedSequence(seed).spawn(n_total))):
            rng = np.random.default_rng(child)
            image, mask, part_mask, inst = render_sample(rng, image_size, n_classes=n_classes,
                                                         max_objects=max_objects, border=border,
                                                         return_instances=True)
            write_image(tmp / "JPEGImages" / f"{img_id}.jpg", image, quality=jpeg_quality)
            write_label_png(tmp / "SegmentationClass" / f"{img_id}.png", mask)
            if debug_parts:
                write_label_png(tmp / "Parts" / f"{img_id}.png", part_mask.astype(np.uint8))
            labels = mask[mask != IGNORE_INDEX]
            present[i, np.unique(labels)] = True
            n_inst[i] = int(inst.max())

        for name, lst in splits.items():
            write_text(tmp / "ImageSets" / "Segmentation" / f"{name}.txt", "".join(f"{x}\n" for x in sorted(lst)))
        write_text(tmp / "classes.txt", "".join(f"{c}\n" for c in classes))

        def _rows(split: str) -> np.ndarray:
            return np.array([int(x[4:]) for x in splits[split]], dtype=np.int64)

        class_counts = {s: {classes[c]: int(present[_rows(s), c].sum()) for c in range(1, n_classes + 1)}
                        for s in splits}
        summary = {
            "classes": list(classes),
            "splits": {s: len(v) for s, v in splits.items()},
            "class_image_counts": class_counts,
            "n_objects": {s: int(n_inst[_rows(s)].sum()) for s in splits},
        }
        write_json(tmp / "toy_dataset.json", {
            "name": "wsss-flow toy dataset",
            "note": ("Synthetic data, procedurally generated by wsss_core.data.toy.make_toy_dataset. "
                     "Objects = a class-agnostic striped body + a small class-distinctive part; "
                     "masks label body + part, 255 marks instance boundaries. Not real images."),
            "format": "PASCAL VOC 2012 (JPEGImages, SegmentationClass, ImageSets/Segmentation)",
            "generator": "wsss_core.data.toy",
            "params": {"seed": seed, "image_size": image_size, "n_train_aug": n_train_aug, "n_train": n_train,
                       "n_val": n_val, "n_classes": n_classes, "max_objects": max_objects, "border": border,
                       "jpeg_quality": jpeg_quality, "debug_parts": debug_parts},
            **summary,
        })

        # Swap into place: the final path only ever names a complete folder.
        if root.exists() or root.is_symlink():
            old = root.parent / f"{root.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        with contextlib.suppress(Exception):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": str(root), **summary}
