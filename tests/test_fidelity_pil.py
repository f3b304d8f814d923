"""Pixel fidelity to the references' PIL / torchvision image ops (issue 15, items 2 and 3), with PIL and torchvision
themselves as the oracle.

- Multi-scale CAM views (:func:`wsss_core.methods.inference.scaled_views`): the references build their image pyramids
  with PIL bicubic (``chenqi1126/SIPE`` / ``Barrett-python/SFC`` ``tool/imutils.py::pil_rescale``, ``usr922/wseg`` /
  ``obeychoi0120/PixMatch`` ``contrast_infer.py::preprocess``, ``xulianuwa/MCTformer`` ``datasets.py::VOC12DatasetMS``).
- FSAE strong-view photometric ops (:mod:`wsss_core.data.augment`): ``obeychoi0120/PixMatch``
  ``data/augmentation/randaugment.py`` (PIL ``ImageOps`` / ``ImageEnhance``) and ``data/dataset.py::ImageDataset``
  (torchvision ``ColorJitter`` and ``GaussianBlur`` on a PIL image).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as TF

from conftest import shared_path
from wsss_core.data import augment as aug
from wsss_core.data.transforms import normalize, resize_pil_bicubic, to_tensor
from wsss_core.methods import inference, mctformer, sipe

CPU = torch.device("cpu")
SCALES = (0.5, 0.75, 1.5, 2.0)


def textured(h: int = 97, w: int = 131, seed: int = 0, lo: int = 0, hi: int = 255) -> np.ndarray:
    """A colour gradient plus Gaussian noise, clipped to [lo, hi]: fine texture (where antialiasing matters) and a
    smooth part, uint8 (h, w, 3)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx + yy) * 127.0 / (h + w) + 60], 2)
    return np.clip(base + g.normal(0, 40, (h, w, 3)), lo, hi).astype(np.uint8)


def pil_bicubic(img: np.ndarray, s: float) -> np.ndarray:
    """The reference view: ``Image.fromarray(img).resize((round(W s), round(H s)), Image.BICUBIC)``."""
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))


def expected_view(u8: np.ndarray) -> torch.Tensor:
    return to_tensor(normalize(u8))


# =====================================================================================================
# Item 2: multi-scale inference views
# =====================================================================================================

def _check_views(img: np.ndarray, scales) -> None:
    views = list(inference.scaled_views(img, scales, True, CPU))
    assert len(views) == len(scales)
    for s, x in zip(scales, views):
        ref = img if s == 1.0 else pil_bicubic(img, s)
        assert np.array_equal(resize_pil_bicubic(img, ref.shape[:2]), ref), s
        assert x.shape == (2, 3) + ref.shape[:2], s
        assert torch.equal(x[0], expected_view(ref)), s
        assert torch.equal(x[1], expected_view(np.ascontiguousarray(ref[:, ::-1]))), s


def test_scaled_views_equal_pil_bicubic():
    _check_views(textured(), (1.0,) + SCALES)


def test_scaled_views_channels_last_same_values():
    img = textured(41, 58, seed=3)
    for a, b in zip(inference.scaled_views(img, SCALES, False, CPU),
                    inference.scaled_views(img, SCALES, False, CPU, channels_last=True)):
        assert torch.equal(a, b)


def test_view_sizes_round_half_to_even_and_scale_one_untouched():
    # 37 x 53 at 0.5 -> 18.5 x 26.5: Python round / np.round (half to even) give 18 x 26, as the references
    # (SIPE ``int(np.round(h * s))``, PixMatch/MCTformer ``round(w * s)``)
    img = textured(37, 53, seed=1)
    shapes = [tuple(x.shape[-2:]) for x in inference.scaled_views(img, (0.5, 1.5, 0.75, 1.0), False, CPU)]
    assert shapes == [(18, 26), (56, 80), (28, 40), (37, 53)]
    assert shapes[:3] == [(int(np.round(37 * s)), int(np.round(53 * s))) for s in (0.5, 1.5, 0.75)]
    # the size-preserving scale is the image itself (SIPE: ``if s == 1: s_img = img``; PIL resize: a copy)
    assert resize_pil_bicubic(img, (37, 53)) is img
    assert np.array_equal(np.asarray(Image.fromarray(img).resize((53, 37), Image.BICUBIC)), img)
    _check_views(img, (0.5, 1.5, 0.75))


def test_old_opencv_cubic_path_would_fail():
    """cv2.INTER_CUBIC (the previous resize) does not antialias: far from PIL at 0.5, so the checks above catch it."""
    img = textured()
    h, w = img.shape[:2]
    for s, floor in ((0.5, 5), (0.75, 5), (1.5, 1), (2.0, 1)):
        ref = pil_bicubic(img, s)
        old = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)
        assert np.abs(old.astype(int) - ref.astype(int)).max() > floor, s


def test_methods_share_the_pil_views():
    """SIPE/SFC (``sipe.fused_views``) and MCTformer (``mctformer.infer_cams``) build their views with this function
    (MCTformer's ``datasets.py::VOC12DatasetMS`` is PIL bicubic at round(W s) x round(H s) too; at its configured
    scale 1.0 the view is the image itself, as before)."""
    assert sipe.scaled_views is inference.scaled_views
    assert mctformer.scaled_views is inference.scaled_views


def test_multiscale_cams_feeds_the_pil_views():
    img = textured(45, 62, seed=4)
    seen = []

    def cam_fn(x):
        seen.append(x.detach().clone().contiguous())
        return x[:, :2]

    inference.multiscale_cams(cam_fn, img, (1.0, 0.5, 1.5), True, CPU, channels_last=False)
    for s, x in zip((1.0, 0.5, 1.5), seen):
        ref = img if s == 1.0 else pil_bicubic(img, s)
        assert torch.equal(x[0], expected_view(ref)), s


def _voc_jpegs():
    folder = shared_path("voc_sample", "JPEGImages")
    files = sorted(folder.glob("*.jpg"))
    if not files:
        pytest.skip(f"no JPEGs in {folder}")
    return files


def test_scaled_views_equal_pil_bicubic_on_real_voc_jpegs():
    for f in _voc_jpegs()[:2]:
        img = np.asarray(Image.open(f).convert("RGB"))
        _check_views(img, SCALES)
        h, w = img.shape[:2]
        old = cv2.resize(img, (round(w * 0.5), round(h * 0.5)), interpolation=cv2.INTER_CUBIC)
        assert np.abs(old.astype(int) - pil_bicubic(img, 0.5).astype(int)).max() > 5, f.name


# =====================================================================================================
# Item 3: FSAE strong-view photometric ops
# =====================================================================================================

def rand_u8(h: int = 29, w: int = 37, seed: int = 0, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8)


IMAGES = {
    "uniform": lambda: rand_u8(seed=1),
    "narrow": lambda: rand_u8(seed=2, lo=31, hi=201),          # autocontrast / equalize have work to do
    "textured": lambda: textured(40, 52, seed=5, lo=12, hi=230),
}

# randaugment.py: AutoContrast, Brightness, Color, Contrast, Equalize, Identity, Posterize, Sharpness, Solarize
PIL_OPS = {
    "AutoContrast": lambda p, v: ImageOps.autocontrast(p),
    "Brightness": lambda p, v: ImageEnhance.Brightness(p).enhance(v),
    "Color": lambda p, v: ImageEnhance.Color(p).enhance(v),
    "Contrast": lambda p, v: ImageEnhance.Contrast(p).enhance(v),
    "Equalize": lambda p, v: ImageOps.equalize(p),
    "Identity": lambda p, v: p,
    "Posterize": lambda p, v: ImageOps.posterize(p, max(1, int(v))),
    "Sharpness": lambda p, v: ImageEnhance.Sharpness(p).enhance(v),
    "Solarize": lambda p, v: ImageOps.solarize(p, v),
}
MAGNITUDES = {
    "Posterize": (4.0, 5.5, 6.99, 7.9, 8.0),
    "Solarize": (0.0, 1.0, 77.3, 128.0, 200.7, 255.5, 256.0),
}


def test_randaugment_table_order_matches_reference():
    assert [o[0] for o in aug.RANDAUGMENT_OPS] == list(PIL_OPS)


@pytest.mark.parametrize("image", list(IMAGES))
@pytest.mark.parametrize("name", list(PIL_OPS))
def test_randaugment_op_equals_pil(name, image):
    img = IMAGES[image]()
    idx = [o[0] for o in aug.RANDAUGMENT_OPS].index(name)
    fn = aug.RANDAUGMENT_OPS[idx][1]
    for v in MAGNITUDES.get(name, (0.05, 0.3, 0.5, 0.77, 0.95, 1.0, 1.4)):
        ref = np.asarray(PIL_OPS[name](Image.fromarray(img), v))
        out = fn(img, v)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.array_equal(out, ref), (name, v)
        assert np.array_equal(aug.apply_randaugment(img, [(idx, v)]), ref), (name, v)
        assert out.flags.writeable


def test_apply_randaugment_chain_equals_pil_chain():
    img = textured(33, 47, seed=7, lo=20, hi=220)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ops = aug.sample_randaugment(5, rng)
        p = Image.fromarray(img)
        for idx, v in ops:
            p = PIL_OPS[aug.RANDAUGMENT_OPS[idx][0]](p, v)
        assert np.array_equal(aug.apply_randaugment(img, ops), np.asarray(p)), ops


@pytest.mark.parametrize("v", [-0.5, -0.1, -0.0371, 0.0, 0.004, 0.05, 0.0999, 0.5])
def test_hue_equals_torchvision_adjust_hue(v):
    for make in IMAGES.values():
        img = make()
        assert np.array_equal(aug.adjust_hue(img, v), np.asarray(TF.adjust_hue(Image.fromarray(img), v))), v


def _jitter_draws(seed: int, jitter=aug.JITTER):
    """The draws of color_jitter_torchvision, in its order: permutation(4), then b, c, s, h factors."""
    b, c, s, h = jitter
    rng = np.random.default_rng(seed)
    order = rng.permutation(4)
    fb = float(rng.uniform(max(0.0, 1 - b), 1 + b))
    fc = float(rng.uniform(max(0.0, 1 - c), 1 + c))
    fs = float(rng.uniform(max(0.0, 1 - s), 1 + s))
    fh = float(rng.uniform(-h, h))
    return rng, order, fb, fc, fs, fh


def _fixed_params(*values):
    """A ``get_params`` replacement for torchvision's ColorJitter (order, b, c, s, h) or GaussianBlur (sigma)."""
    out = (torch.as_tensor(values[0]), *values[1:]) if len(values) > 1 else values[0]
    return lambda *_: out


@pytest.mark.parametrize("seed", range(8))
def test_color_jitter_equals_torchvision_colorjitter(seed):
    """torchvision's own ColorJitter.forward on the PIL image, fed our order and factors (its get_params replaced),
    and, independently, its functional ops chained in that order."""
    for make in IMAGES.values():
        img = make()
        rng = np.random.default_rng(seed)
        out = aug.color_jitter_torchvision(img, rng)
        ref_rng, order, fb, fc, fs, fh = _jitter_draws(seed)
        assert rng.bit_generator.state == ref_rng.bit_generator.state  # same draws, same count
        cj = transforms.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
        cj.get_params = _fixed_params(order, fb, fc, fs, fh)
        assert np.array_equal(out, np.asarray(cj(Image.fromarray(img)))), seed
        p = Image.fromarray(img)
        for o in order:
            p = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[o](
                p, (fb, fc, fs, fh)[o])
        assert np.array_equal(out, np.asarray(p)), seed


def test_color_jitter_none_draws_nothing():
    img = rand_u8()
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    out = aug.color_jitter_torchvision(img, rng, None)
    assert np.array_equal(out, img) and out is not img and rng.bit_generator.state == state


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_gaussian_blur_equals_torchvision(kernel):
    img = textured(30, 44, seed=9)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        out = aug.gaussian_blur(img, rng, kernel=kernel)
        ref_rng = np.random.default_rng(seed)
        sg = float(ref_rng.uniform(*aug.BLUR_SIGMA))
        assert rng.bit_generator.state == ref_rng.bit_generator.state
        gb = transforms.GaussianBlur(kernel, sigma=aug.BLUR_SIGMA)
        gb.get_params = _fixed_params(sg)
        assert np.array_equal(out, np.asarray(gb(Image.fromarray(img)))), (kernel, seed)


def test_strong_view_equals_reference_chain():
    """make_weak_strong_views' strong view = resize/flip (ours) -> torchvision ColorJitter -> crop -> torchvision blur
    -> PIL RandAugment, with the draws read off the same generator stream."""
    img = textured(50, 70, seed=11)
    kw = {"crop": 40, "resize_long": (44, 80), "blur_kernel": 3, "n_strong_augs": 5}
    for seed in range(4):
        out = aug.make_weak_strong_views(img, np.random.default_rng(seed), **kw)
        rng = np.random.default_rng(seed)
        geom = aug.sample_geometry(img.shape[:2], rng, crop=40, resize_long=(44, 80))
        base = aug.resize_flip(img, geom)
        _ = aug.color_jitter_torchvision(base, rng)  # the weak view's jitter
        order = rng.permutation(4)  # the strong view's jitter draws
        fb, fc, fs = (float(rng.uniform(0.7, 1.3)) for _ in range(3))
        fh = float(rng.uniform(-0.1, 0.1))
        cj = transforms.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
        cj.get_params = _fixed_params(order, fb, fc, fs, fh)
        s = aug.crop_box(np.asarray(cj(Image.fromarray(base))), geom)
        sg = float(rng.uniform(*aug.BLUR_SIGMA))
        p = TF.gaussian_blur(Image.fromarray(s), [3, 3], [sg, sg])
        ops = aug.sample_randaugment(5, rng)
        for idx, v in ops:
            p = PIL_OPS[aug.RANDAUGMENT_OPS[idx][0]](p, v)
        assert out["ra_ops"] == ops
        assert np.array_equal(out["strong_u8"], np.asarray(p)), seed
