"""FSAE core ops (wsss_core.methods.fsae_ops) and its views (wsss_core.data.augment) on tiny CPU inputs, against
the behaviour of the FSAE code ``obeychoi0120/PixMatch`` (``module/train.py::train_ssl``, ``module/ema.py``,
``data/dataset.py``)."""

from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from wsss_core.data import augment as aug
from wsss_core.methods import fsae_ops as fo


def _logits_one_class(h=4, w=4, c=20, cls=3):
    z = torch.zeros(1, c + 1, h, w)
    z[0, cls, 0, 0] = 10.0
    lab = torch.zeros(1, c)
    lab[0, cls] = 1
    return z, lab


# ---------------- confidence mask + class masking (train_ssl) ----------------

def test_class_masking_and_confidence():
    z, lab = _logits_one_class()
    z = z + torch.randn_like(z)  # absent channels non-zero before masking
    z[0, :, 0, 0] = 0
    z[0, 3, 0, 0] = 10.0
    z[0, :, 1, 1] = 0
    zm = fo.mask_absent_classes(z, lab)
    absent = [c for c in range(20) if c != 3]
    assert torch.count_nonzero(zm[:, absent]) == 0
    assert torch.equal(zm[:, 20], z[:, 20]) and torch.equal(zm[:, 3], z[:, 3])
    out = fo.teacher_pseudo_labels(z, lab)
    p = math.exp(10) / (math.exp(10) + 20)
    assert out["conf"][0, 0, 0].item() == pytest.approx(p, rel=1e-6)
    assert out["mask_conf"][0, 0, 0] and out["pseudo"][0, 0, 0] == 3 and out["target"][0, 0, 0] == 3
    assert out["conf"][0, 1, 1].item() == pytest.approx(1 / 21, rel=1e-6)
    assert not out["mask_conf"][0, 1, 1] and out["target"][0, 1, 1] == fo.IGNORE_INDEX


def test_bg_first_layout():
    z = torch.zeros(1, 21, 2, 2)
    z[0, 4, 0, 0] = 10.0  # fg class 3 with bg at channel 0
    lab = torch.zeros(1, 20)
    lab[0, 3] = 1
    z[0, 5] = 7.0  # absent class 4 -> zeroed
    zm = fo.mask_absent_classes(z, lab, bg_index=0)
    assert torch.count_nonzero(zm[0, 5]) == 0 and torch.equal(zm[0, 0], z[0, 0])
    out = fo.teacher_pseudo_labels(z, lab, bg_index=0)
    assert out["mask_fg"][0, 0, 0] and out["pseudo"][0, 0, 0] == 4


def test_absent_classes_never_confident():
    z = torch.randn(2, 21, 5, 5) * 20
    lab = torch.zeros(2, 20)
    lab[:, 0] = 1
    out = fo.teacher_pseudo_labels(z, lab)
    absent_hit = (out["pseudo"] >= 1) & (out["pseudo"] < 20) & out["mask_conf"]
    assert not absent_hit.any()


def test_threshold_is_inclusive_at_exactly_p_cutoff():
    # train_ssl: M_conf = [conf >= p_cutoff]; probs built directly so conf is exactly 0.95 / 0.8
    probs = torch.zeros(1, 3, 1, 3, dtype=torch.float64)
    probs[0, :, 0, 0] = torch.tensor([0.95, 0.05, 0.0], dtype=torch.float64)
    probs[0, :, 0, 1] = torch.tensor([0.9499999, 0.0500001, 0.0], dtype=torch.float64)
    probs[0, :, 0, 2] = torch.tensor([0.0, 0.96, 0.04], dtype=torch.float64)
    conf, pseudo, m = fo.confident_mask(probs, 0.95)
    assert m.tolist() == [[[True, False, True]]]
    assert pseudo.tolist() == [[[0, 0, 1]]]
    # ring cutoff is inclusive too
    mask_fg = torch.tensor([[[True, False, False]]])
    ring = fo.boundary_ring(mask_fg, torch.tensor([[[1.0, 0.8, 0.8]]], dtype=torch.float64), 3, 0.8)
    assert ring.tolist() == [[[False, True, False]]]


# ---------------- boundary ring geometry (train_ssl, --bdry) ----------------

def test_ring_center_block_16_pixels_and_gating():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 2:5, 2:5] = True
    conf = torch.full((1, 7, 7), 0.9)
    ring = fo.boundary_ring(m, conf, 3, 0.8)
    assert int(ring.sum()) == 16
    assert not (ring & m).any()
    expected = torch.zeros(1, 7, 7, dtype=torch.bool)
    expected[0, 1:6, 1:6] = True
    expected[0, 2:5, 2:5] = False
    assert torch.equal(ring, expected)
    assert int(fo.boundary_ring(m, conf, 3, 0.95).sum()) == 0


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_ring_matches_cv2_dilate(size):
    g = np.random.default_rng(size)
    m = g.random((3, 13, 11)) > 0.85
    conf = g.random((3, 13, 11))
    tm, tc = torch.from_numpy(m), torch.from_numpy(conf)
    k = np.ones((size, size), np.uint8)
    dil = np.stack([cv2.dilate(x.astype(np.uint8), k, iterations=1) > 0 for x in m])
    assert np.array_equal(fo.dilate(tm, size).numpy(), dil)
    ring_ref = dil & ~m & (conf >= 0.8)
    assert np.array_equal(fo.boundary_ring(tm, tc, size, 0.8).numpy(), ring_ref)


def test_ring_from_teacher_uses_fg_only_and_argmax_labels():
    # a confident fg (class 5) 3x3 block; ring pixels: bg moderately confident (0.9 after softmax)
    z = torch.zeros(1, 21, 7, 7)
    lab = torch.zeros(1, 20)
    lab[0, 5] = 1
    z[0, 5, 2:5, 2:5] = 20.0
    bg_logit = math.log(0.9 * 20 / 0.1)  # p_bg = 0.9 with 20 zero logits (19 absent + class 5 at 0)
    z[0, 20] = bg_logit
    z[0, 20, 2:5, 2:5] = 0.0
    z[0, 20, 0, :] = 10.0  # confident bg row at the top (overlaps nothing of the ring)
    out = fo.teacher_pseudo_labels(z, lab)
    assert int(out["mask_fg"].sum()) == 9
    assert int(out["ring"].sum()) == 16
    assert (out["pseudo"][out["ring"]] == 20).all()  # ring labels are the teacher argmax (bg here)
    assert torch.equal(out["mask"], out["mask_conf"] | out["ring"])
    assert not fo.teacher_pseudo_labels(z, lab, bdry=False)["ring"].any()
    assert not fo.teacher_pseudo_labels(z, lab, bdry_cutoff=0.95)["ring"].any()


# ---------------- loss normalisation (train_ssl, loss_semcon) ----------------

def test_pixel_ce_empty_mask_is_zero_with_zero_grad():
    z = torch.randn(2, 21, 4, 4, requires_grad=True)
    t = torch.full((2, 4, 4), 255, dtype=torch.long)
    loss = fo.pixel_ce(z, t)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_pixel_ce_single_pixel_divided_by_all_pixels():
    z = torch.randn(1, 21, 4, 4)
    t = torch.full((1, 4, 4), 255, dtype=torch.long)
    t[0, 1, 2] = 7
    ce = -torch.log_softmax(z[0, :, 1, 2], 0)[7]
    assert fo.pixel_ce(z, t).item() == pytest.approx(ce.item() / 16, rel=1e-6)


def test_pixel_ce_vanishes_for_matching_onehot():
    y = torch.randint(0, 21, (2, 4, 4))
    z = 50.0 * torch.nn.functional.one_hot(y, 21).permute(0, 3, 1, 2).float()
    assert fo.pixel_ce(z, y).item() < 1e-12


def test_fsae_loss_empty_teacher_mask_zero():
    z_w = torch.zeros(1, 21, 4, 4)
    lab = torch.zeros(1, 20)
    lab[0, 1] = 1
    t = fo.teacher_pseudo_labels(z_w, lab)
    z_s = torch.randn(1, 21, 4, 4, requires_grad=True)
    for variant in ("union", "separate"):
        out = fo.fsae_loss(z_s, lab, t, variant=variant)
        assert out["loss"].item() == 0.0
        out["loss"].backward()
        assert torch.count_nonzero(z_s.grad) == 0


def test_ring_variants_relation():
    g = torch.Generator().manual_seed(0)
    z_w = torch.randn(2, 21, 9, 9, generator=g) * 6
    lab = torch.zeros(2, 20)
    lab[:, [2, 7]] = 1
    # make ring pixels that are also confident background (the double-count case)
    z_w[:, 2, 3:6, 3:6] = 30
    z_w[:, 20, 2, 2:7] = 40
    t = fo.teacher_pseudo_labels(z_w, lab)
    overlap = t["ring"] & t["mask_conf"]
    assert t["ring"].any() and overlap.any()
    z_s = torch.randn(2, 21, 9, 9, generator=g)
    union = fo.fsae_loss(z_s, lab, t, variant="union")["loss"]
    sep = fo.fsae_loss(z_s, lab, t, variant="separate", bdry_lambda=1.0)
    zm = fo.mask_absent_classes(z_s, lab)
    extra = fo.pixel_ce(zm, torch.where(overlap, t["pseudo"], torch.full_like(t["pseudo"], 255)))
    assert sep["loss"].item() == pytest.approx(union.item() + extra.item(), rel=1e-6)
    # disjoint case: equal
    t2 = dict(t)
    t2["mask_conf"] = t["mask_conf"] & ~t["ring"]
    t2["mask"] = t2["mask_conf"] | t["ring"]
    ign = torch.full_like(t["pseudo"], 255)
    t2["target_conf"] = torch.where(t2["mask_conf"], t["pseudo"], ign)
    t2["target"] = torch.where(t2["mask"], t["pseudo"], ign)
    u2 = fo.fsae_loss(z_s, lab, t2, variant="union")["loss"]
    s2 = fo.fsae_loss(z_s, lab, t2, variant="separate", bdry_lambda=1.0)
    assert s2["loss"].item() == pytest.approx(u2.item(), rel=1e-6)
    s3 = fo.fsae_loss(z_s, lab, t2, variant="separate", bdry_lambda=0.5)
    assert s3["loss"].item() == pytest.approx(s2["loss_pl"].item() + 0.5 * s2["loss_ring"].item(), rel=1e-6)


def test_fsae_loss_student_masking_and_grad():
    z_w, lab = _logits_one_class()
    t = fo.teacher_pseudo_labels(z_w, lab)
    z_s = torch.randn(1, 21, 4, 4, requires_grad=True)
    out = fo.fsae_loss(z_s, lab, t)
    out["loss"].backward()
    absent = [c for c in range(20) if c != 3]
    assert torch.count_nonzero(z_s.grad[:, absent]) == 0  # x0 masking blocks absent-class gradient
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0


# ---------------- EMA (module/ema.py::EMA) ----------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 2, 1)
        for p in self.a.parameters():
            p.requires_grad_(False)


def _perturb(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
        net.bn.running_mean.add_(torch.randn(4, generator=g))


def test_ema_update_separate_teacher():
    torch.manual_seed(0)
    student = _Net()
    teacher = copy.deepcopy(student)
    t0 = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    _perturb(student, 2)
    with torch.no_grad():
        student.a.weight.add_(1.0)  # frozen param changed: copied, not averaged
    fo.ema_update_(teacher, student, 0.999)
    for n, s in student.named_parameters():
        t = dict(teacher.named_parameters())[n]
        if s.requires_grad:
            assert torch.allclose(t, 0.999 * t0[n] + 0.001 * s.detach(), atol=0, rtol=1e-6)
        else:
            assert torch.equal(t, s)
    for (n, b), (_, tb) in zip(student.named_buffers(), teacher.named_buffers()):
        assert torch.equal(b, tb), n


# ---------------- views (data/dataset.py) and RandAugment (data/augmentation/randaugment.py) ----------------

def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _coords(h, w):
    return (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)


def test_views_identical_when_photometric_off():
    img = _image()
    out = aug.make_weak_strong_views(img, np.random.default_rng(3), crop=32, resize_long=(40, 60), jitter=None,
                                     blur_kernel=1, n_strong_augs=0)
    assert np.array_equal(out["weak_u8"], out["strong_u8"])
    assert torch.equal(out["img_w"], out["img_s"]) and out["img_w"].shape == (3, 32, 32)


def test_views_share_geometry_and_labels_align():
    h, w = 37, 53
    img = _image(h, w)
    coords = _coords(h, w)
    sal = np.full((h, w), 255, np.uint8)
    for seed in range(6):
        out = aug.make_weak_strong_views(img, np.random.default_rng(seed), saliency=sal, label=coords, crop=48,
                                         resize_long=(40, 70), n_strong_augs=5, blur_kernel=3)
        gw, gs = out["geometry_w"], out["geometry_s"]
        assert (gw["target_long"], gw["hflip"], gw["box"]) == (gs["target_long"], gs["hflip"], gs["box"])
        assert out["weak_u8"].shape == out["strong_u8"].shape == (48, 48, 3)
        # the label follows the weak geometry exactly (independent re-implementation of resize/flip/crop)
        H, W = gw["size"]
        ref = cv2.resize(coords, (W, H), interpolation=cv2.INTER_NEAREST)
        if gw["hflip"]:
            ref = ref[:, ::-1]
        top, left, oy, ox = gw["box"]
        canvas = np.full((max(H, 48), max(W, 48)), 255, np.uint8)
        canvas[oy:oy + H, ox:ox + W] = ref
        assert np.array_equal(out["label"], canvas[top:top + 48, left:left + 48])
        assert np.array_equal(aug.apply_geometry(coords, gs, label=True, pad=255), out["label"])
        # saliency: ones inside the image, zero pad, (1, h, w)
        assert out["saliency"].shape == (1, 48, 48)
        assert torch.equal(out["saliency"][0] > 0.5, torch.from_numpy(out["label"] != 255))


def test_strong_geometry_pixel_aligned_under_pointwise_photometric():
    # ColorJitter + pointwise RandAugment ops map equal input pixels to equal outputs: a 2-colour image keeps
    # its partition (no pad here), so the strong view's colour regions coincide with the weak view's pixel for pixel.
    h, w = 30, 40
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 3] = (200, 60, 30)
    img[5:20, 25:] = (40, 150, 220)
    for seed in range(5):
        # crop smaller than the image: no pad (the black pad is added after ColorJitter, as in PixMatch data/dataset.py)
        out = aug.make_weak_strong_views(img, np.random.default_rng(seed), crop=24, resize_long=None,
                                         n_strong_augs=0, blur_kernel=1)
        a, b = out["weak_u8"], out["strong_u8"]
        assert not np.array_equal(a, b)
        ka = a.reshape(-1, 3) @ np.array([1, 256, 65536])
        kb = b.reshape(-1, 3) @ np.array([1, 256, 65536])
        # same partition: equal colour in weak <=> equal colour in strong
        assert np.array_equal(ka[:, None] == ka[None], kb[:, None] == kb[None])


def test_strong_differs_and_determinism():
    img = _image(60, 80, seed=5)
    kw = dict(crop=48, resize_long=(50, 90), n_strong_augs=5)
    o1 = aug.make_weak_strong_views(img, np.random.default_rng(11), **kw)
    o2 = aug.make_weak_strong_views(img, np.random.default_rng(11), **kw)
    o3 = aug.make_weak_strong_views(img, np.random.default_rng(12), **kw)
    for k in ("weak_u8", "strong_u8"):
        assert np.array_equal(o1[k], o2[k])
    assert o1["ra_ops"] == o2["ra_ops"] and o1["geometry_w"] == o2["geometry_w"]
    assert not np.array_equal(o1["weak_u8"], o1["strong_u8"])
    assert not (np.array_equal(o1["strong_u8"], o3["strong_u8"]) and o1["ra_ops"] == o3["ra_ops"])


def test_randaugment_sampling():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        ops = aug.sample_randaugment(5, rng)
        assert len(ops) == 5
        for idx, v in ops:
            assert 0 <= idx <= 8
            lo, hi = aug.op_range(idx)
            assert lo <= v <= hi
            seen.add(idx)
    assert seen == set(range(9))  # with replacement over all 9 photometric ops
    assert aug.sample_randaugment(0, rng) == []
    with pytest.raises(ValueError):
        aug.sample_randaugment(1, rng, use_geom_augs=True)


def test_identity_and_unit_magnitude_ops_are_noops():
    img = _image(20, 24, seed=9)
    names = [o[0] for o in aug.RANDAUGMENT_OPS]
    for name in ("Identity", "Brightness", "Color", "Contrast", "Sharpness"):
        out = aug.apply_randaugment(img, [(names.index(name), 1.0)])
        assert np.array_equal(out, img), name
    assert np.array_equal(aug.posterize(img, 8), img)
    assert np.array_equal(aug.solarize(img, 256), img)
    assert np.array_equal(aug.solarize(img, 0), 255 - img)
    # magnitudes below 1 act as documented: brightness darkens, colour desaturates
    assert aug.adjust_brightness(img, 0.5).astype(int).sum() < img.astype(int).sum()
    grey_spread = lambda x: np.abs(x.astype(float) - x.astype(float).mean(2, keepdims=True)).mean()
    assert grey_spread(aug.adjust_color(img, 0.3)) < grey_spread(img)


def test_blur_kernel_one_is_an_identity():
    img = _image(16, 16)
    assert np.array_equal(aug.gaussian_blur(img, np.random.default_rng(0), kernel=1), img)
    assert not np.array_equal(aug.gaussian_blur(img, np.random.default_rng(0), kernel=5), img)
