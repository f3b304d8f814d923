"""Tests of wsss_core.refine: pydensecrf label-unary energies, CRF label stability, bg-power monotonicity."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydensecrf")

from pydensecrf.utils import unary_from_labels, unary_from_softmax  # noqa: E402

from wsss_core.errors import ConfigError  # noqa: E402
from wsss_core.refine import (  # noqa: E402
    PRESETS,
    CRFParams,
    bg_power,
    compact_hard_labels,
    crf_params,
    crf_refine_cams,
    dense_crf,
)


def two_colour_image(h=32, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (220, 40, 30)
    img[:, w // 2:] = (20, 60, 230)
    return img


def split_labels(h=32, w=32, fg=1):
    lab = np.zeros((h, w), np.int64)
    lab[:, w // 2:] = fg
    return lab


# ----------------------------------------------------------------------------- presets

def test_presets_and_overrides():
    p = PRESETS["seam_label"]
    assert (p.mode, p.gauss_sxy, p.gauss_compat, p.bilat_sxy, p.bilat_srgb, p.bilat_compat, p.iters, p.gt_prob,
            p.label_unary, p.pairwise) == ("labels", 3, 3, 50, 5, 10, 10, 0.7, "all", "add")
    assert PRESETS["psa_softmax"] == CRFParams("softmax", 3, 3, 80, 13, 10, 10)
    assert PRESETS["deeplab_test"] == CRFParams("softmax", 3, 3, 32, 13, 10, 1)
    assert PRESETS["mctformer_seg"] == CRFParams("softmax", 4, 3, 83, 5, 3, 10)
    q = crf_params("psa_softmax", iters=5)
    assert q.iters == 5 and q.bilat_sxy == 80 and PRESETS["psa_softmax"].iters == 10
    assert crf_params(None, mode="labels", gauss_sxy=3, gauss_compat=3, bilat_sxy=50, bilat_srgb=5,
                      bilat_compat=10, iters=10, label_unary="all") == PRESETS["seam_label"]
    assert crf_params("seam_label", label_unary="present").label_unary == "present"
    with pytest.raises(ConfigError):
        crf_params("nope")
    with pytest.raises(ConfigError):
        crf_params("seam_label", sigma=3)
    with pytest.raises(ConfigError):
        crf_params(None, mode="labels")
    with pytest.raises(ConfigError):
        crf_params("seam_label", mode="hard")
    with pytest.raises(ConfigError):
        crf_params("seam_label", gt_prob=1.0)
    with pytest.raises(ConfigError):
        crf_params("seam_label", label_unary="some")
    with pytest.raises(ConfigError):
        crf_params("seam_label", pairwise="lattice")


# ----------------------------------------------------------------------------- 4. unary energies

def test_label_unary_energies():
    lab = split_labels(4, 6, fg=15)
    u = unary_from_labels(lab, 21, 0.7, zero_unsure=False)
    assert u.shape == (21, 24) and u.dtype == np.float32
    flat = lab.ravel()
    given = u[flat, np.arange(flat.size)]
    np.testing.assert_allclose(given, -np.log(0.7), rtol=1e-6)
    other = np.ones_like(u, dtype=bool)
    other[flat, np.arange(flat.size)] = False
    np.testing.assert_allclose(u[other], -np.log(0.015), rtol=1e-6)
    assert round(float(-np.log(0.7)), 4) == 0.3567 and round(float(-np.log(0.015)), 4) == 4.1997
    # softmax unary: -ln(clip(p, 1e-5, 1)), no renormalisation
    p = np.array([[[0.0, 0.5, 2.0]]], np.float32)
    np.testing.assert_allclose(unary_from_softmax(p).ravel(), [-np.log(1e-5), -np.log(0.5), 0.0], rtol=1e-6)


def test_dense_crf_passes_the_label_unary():
    """With 0 iterations Q is the normalised exp(-unary): 0.7 on the given label and 0.015 elsewhere."""
    img = two_colour_image(4, 6)
    lab = split_labels(4, 6, fg=15)
    q = dense_crf(img, lab, crf_params("seam_label", iters=0), n_labels=21)
    assert q.shape == (21, 4, 6) and q.dtype == np.float32
    np.testing.assert_allclose(q[0, :, :3], 0.7, rtol=1e-5)
    np.testing.assert_allclose(q[15, :, 3:], 0.7, rtol=1e-5)
    np.testing.assert_allclose(q[3], 0.015, rtol=1e-4)


# ----------------------------------------------------------------------------- 5. CRF keeps confident labels

def test_two_colour_split_kept_label_and_softmax():
    img = two_colour_image()
    lab = split_labels()
    q = dense_crf(img, lab, PRESETS["seam_label"], n_labels=2)
    np.testing.assert_allclose(q.sum(axis=0), 1.0, rtol=1e-4)
    label_result = q.argmax(axis=0)
    np.testing.assert_array_equal(label_result, lab)
    onehot = np.stack([lab == 0, lab == 1]).astype(np.float32)
    for preset in ("seam_label", "psa_softmax", "deeplab_test"):
        qs = dense_crf(img, np.clip(onehot, 1e-5, 1.0), crf_params(preset, mode="softmax"))
        np.testing.assert_array_equal(qs.argmax(axis=0), label_result)


def test_width_first_on_non_square_image():
    h, w = 20, 37
    img = np.zeros((h, w, 3), np.uint8)
    img[:, 25:] = 255
    lab = np.zeros((h, w), np.int64)
    lab[:, 25:] = 1
    q = dense_crf(img, lab, PRESETS["seam_label"], n_labels=2)
    assert q.shape == (2, h, w)
    np.testing.assert_array_equal(q.argmax(0), lab)


@pytest.mark.parametrize("n_labels", [21, 2])
def test_single_pixel_island_removed_by_label_unary(n_labels):
    """Pinned behaviour (verified): the unary margin (3.84 nats for n=21, 0.85 for n=2) is below the
    Potts penalty of the 50/5/10 bilateral kernel inside a flat region, so the island disappears."""
    img = two_colour_image()
    lab = split_labels()
    lab[8, 5] = 1      # island of label 1 inside the left (label 0) region
    lab[20, 25] = 0    # island of label 0 inside the right region
    out = dense_crf(img, lab, PRESETS["seam_label"], n_labels=n_labels).argmax(0)
    np.testing.assert_array_equal(out, split_labels())


def test_dense_crf_validation():
    img = two_colour_image(8, 8)
    lab = split_labels(8, 8)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), lab, PRESETS["seam_label"], n_labels=2)
    with pytest.raises(ValueError, match="n_labels"):
        dense_crf(img, lab, PRESETS["seam_label"])
    with pytest.raises(ValueError):
        dense_crf(img, lab, PRESETS["seam_label"], n_labels=1)          # label 1 out of range
    with pytest.raises(ValueError):
        dense_crf(img, lab.T[:4], PRESETS["seam_label"], n_labels=2)     # wrong shape
    with pytest.raises(ValueError):
        dense_crf(img, lab.astype(np.float32), PRESETS["seam_label"], n_labels=2)
    with pytest.raises(ValueError):
        dense_crf(img, np.ones((2, 8, 9), np.float32), PRESETS["psa_softmax"])
    with pytest.raises(ValueError):
        dense_crf(img, np.ones((2, 8, 8), np.float32), PRESETS["psa_softmax"], n_labels=3)
    with pytest.raises(ValueError):
        dense_crf(img[..., :2], lab, PRESETS["seam_label"], n_labels=2)
    # non-contiguous image is accepted (made contiguous)
    q = dense_crf(np.asfortranarray(img), lab, PRESETS["seam_label"], n_labels=2)
    np.testing.assert_array_equal(q.argmax(0), lab)


# ----------------------------------------------------------------------------- crf_refine_cams

@pytest.mark.parametrize("preset", ["seam_label", "psa_softmax"])
def test_crf_refine_cams_maps_back_to_keys(preset):
    img = two_colour_image()
    cams = np.zeros((2, 32, 32), np.float32)
    cams[0, :, 16:] = 0.8      # class 15 on the right
    cams[1, :, 16:] = 0.3      # a weaker class 3 everywhere on the right
    cams[0, 8, 5] = 0.9        # single noisy pixel on the left
    out = crf_refine_cams(img, cams, np.array([15, 3]), 0.26, PRESETS[preset], n_classes=21)
    assert out.dtype == np.uint8 and out.shape == (32, 32)
    expected = np.where(split_labels() == 1, 15, 0)
    np.testing.assert_array_equal(out, expected)


def test_crf_refine_cams_empty_and_validation():
    img = two_colour_image(8, 8)
    out = crf_refine_cams(img, np.zeros((0, 8, 8), np.float32), np.zeros(0, int), 0.2, PRESETS["seam_label"])
    assert out.shape == (8, 8) and out.dtype == np.uint8 and (out == 0).all()
    with pytest.raises(ValueError):
        crf_refine_cams(img, np.zeros((1, 8, 7), np.float32), np.array([1]), 0.2, PRESETS["seam_label"])
    with pytest.raises(ValueError):
        crf_refine_cams(img, np.zeros((1, 8, 8), np.float32), np.array([0]), 0.2, PRESETS["seam_label"])


def test_compact_hard_labels_ties_go_to_bg():
    cams = np.array([[[0.3, 0.5]], [[0.1, 0.5]]], np.float32)   # (K=2, 1, 2)
    lab = compact_hard_labels(cams, 0.3)
    assert lab.tolist() == [[0, 1]]      # tie with bg -> 0; tie between fg channels -> lower k


# ----------------------------------------------------------------------------- 6. bg power monotonicity

def test_bg_power_monotone_in_alpha():
    rng = np.random.default_rng(0)
    cams = np.round(rng.random((3, 40, 40)), 2).astype(np.float32)   # max <= 0.99 unless exactly 1
    cams[:, :3, :3] = 0.0                  # max = 0 pixels
    cams[1, 10:12, 10:12] = 1.0            # max = 1 pixels
    alphas = [1e-6, 0.1, 0.5, 1, 2, 4, 8, 16, 24, 32]
    counts = []
    for a in alphas:
        fg = compact_hard_labels(cams, bg_power(cams, a)) > 0
        counts.append(int(fg.sum()))
        assert not fg[:3, :3].any()                       # max = 0: bg for every alpha
        assert fg[10:12, 10:12].all()                      # max = 1: bg = 0, fg wins
    assert counts == sorted(counts) and counts[-1] > counts[0]
    mx = cams.max(0)
    fg_small = compact_hard_labels(cams, bg_power(cams, 1e-6)) > 0
    np.testing.assert_array_equal(fg_small, mx == 1.0)     # alpha -> 0+: only max = 1 stays fg
    with pytest.raises(ValueError):
        bg_power(cams, 0.0)


# ----------------------------------------------------------------------------- crf_cam_probs (AffinityNet la/ha labels)

def test_psa_aff_label_preset_and_crf_cam_probs():
    from wsss_core.refine.crf import crf_cam_probs

    assert PRESETS["psa_aff_label"] == CRFParams("labels", 3, 3, 80, 13, 10, 10, 0.7, label_unary="all",
                                                 pairwise="utils")
    img = two_colour_image(16, 16)
    rng = np.random.default_rng(0)
    cams = rng.random((2, 16, 16)).astype(np.float32)
    bg = bg_power(cams, 2)
    # iters 0: Q = the unary's softmax = the clipped [bg, cams] stack divided by its per-pixel sum
    q0 = crf_cam_probs(img, cams, bg, crf_params("psa_softmax", iters=0))
    stack = np.clip(np.concatenate([bg[None], cams]), 1e-5, 1)
    np.testing.assert_allclose(q0, stack / stack.sum(0, keepdims=True), rtol=1e-4, atol=1e-6)
    for preset in ("psa_aff_label", "psa_softmax"):
        q = crf_cam_probs(img, cams, bg, PRESETS[preset], keys=np.array([4, 11]), n_classes=21)
        assert q.shape == (3, 16, 16) and q.dtype == np.float32
        if preset == "psa_softmax":
            np.testing.assert_allclose(q.sum(0), 1, rtol=1e-5)
        else:   # the channels [0, 4, 11] of Q over 21 labels: the 18 absent ones hold the rest
            assert float(q.sum(0).max()) <= 1 + 1e-5 and float(q.sum(0).min()) > 0.5
        lab = crf_refine_cams(img, cams, np.array([4, 11]), bg, PRESETS[preset], n_classes=21)
        np.testing.assert_array_equal(lab, np.array([0, 4, 11])[q.argmax(0)])
    with pytest.raises(ValueError, match="n_classes"):
        crf_cam_probs(img, cams, bg, PRESETS["psa_aff_label"], keys=np.array([4, 11]))
    with pytest.raises(ValueError, match="keys"):
        crf_cam_probs(img, cams, bg, PRESETS["psa_aff_label"], n_classes=21)
    with pytest.raises(ValueError, match="n_classes"):
        crf_refine_cams(img, cams, np.array([4, 11]), bg, PRESETS["seam_label"])
    with pytest.raises(ValueError, match="exceed"):
        crf_refine_cams(img, cams, np.array([4, 11]), bg, PRESETS["seam_label"], n_classes=5)
    assert (crf_cam_probs(img, np.zeros((0, 16, 16), np.float32), 0.3, PRESETS["psa_softmax"]) == 1).all()
