"""Tests of the PPC loss / op core (``wsss_core.methods.ppc_ops``) against ``usr922/wseg`` (master
``network/resnet38_contrast.py::Net.PCM``, ``contrast_train.py``, ``tool/torchutils.py::PolyOptimizer``; ``esp``
``module/train.py::get_contrast_loss``). Tiny CPU tensors only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.engine.optim import reference_sgd
from wsss_core.methods import ppc_ops as P

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- normalisation


def test_max_norm_range_and_per_channel_max():
    x = torch.randn(2, 5, 6, 7, generator=_g())
    y = P.max_norm(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() < 1
    assert torch.allclose(y.flatten(2).max(-1).values, torch.ones(2, 5), atol=1e-4)


@pytest.mark.parametrize("bg_index", [0, -1])
def test_contrast_norm_cam_hand(bg_index):
    cam = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    cam[0, 1] = torch.tensor([[-1.0, 0.0], [2.0, 4.0]])
    out = P.contrast_norm_cam(cam, bg_thr=0.2, bg_index=bg_index)
    fg = 2 if bg_index == 0 else 0  # an unmodified fg channel
    e = 1e-5
    # channel 'fg' holds [1,2,3,5]: min 1, max 5; the min pixel is zeroed first -> (0-1-e)/(4+e)
    exp = torch.tensor([[(0 - 1 - e), (2 - 1 - e)], [(3 - 1 - e), (5 - 1 - e)]]) / (4 + e)
    assert torch.allclose(out[0, fg], exp, atol=1e-7)
    assert out[0, fg, 0, 0] < 0  # minimum pixels end up negative (get_contrast_loss's -1e-5)
    # channel 1 after relu holds [0,0,2,4]: min 0
    exp1 = (torch.tensor([[0.0, 0.0], [2.0, 4.0]]) - e) / (4 + e)  # channel 1 is fg in both layouts
    assert torch.allclose(out[0, 1], exp1, atol=1e-7)
    assert torch.all(out[0, P._bg(bg_index, 3)] == 0.2)
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------------- PCM


@pytest.mark.parametrize("bg_index", [0, -1])
def test_pcm_seed(bg_index):
    cam = torch.randn(2, 21, 4, 4, generator=_g(1))
    s = P.pcm_seed(cam, bg_index)
    b = bg_index % 21
    fg = [i for i in range(21) if i != b]
    norm = F.relu(cam - 1e-5) / (F.relu(cam).flatten(2).max(-1).values[..., None, None] + 1e-5)
    assert torch.allclose(s[:, b], 1 - norm[:, fg].max(1).values)
    assert torch.all((s[:, fg] > 0).sum(1) <= 1)
    assert torch.allclose(s[:, fg].max(1).values, norm[:, fg].max(1).values)


def test_pcm_affinity_shape_and_columns_sum_to_one():
    feat = torch.randn(2, 8, 3, 5, generator=_g(2))
    a = P.pcm_affinity(feat)
    assert a.shape == (2, 15, 15)
    assert torch.all(a >= 0)
    assert torch.allclose(a.sum(1), torch.ones(2, 15), atol=1e-4)  # columns (master Net.PCM)
    out = P.pcm(torch.randn(2, 21, 3, 5, generator=_g(3)), feat)
    assert out.shape == (2, 21, 3, 5)


def test_pcm_identity_for_orthogonal_features():
    s = torch.rand(1, 21, 4, 4, generator=_g(4))
    feat = torch.eye(16).view(1, 16, 4, 4) * 3.0  # one-hot per pixel -> A = I
    a = P.pcm_affinity(feat)
    assert torch.allclose(a[0], torch.eye(16), atol=1e-4)
    assert torch.allclose(P.pcm_refine(s, a), s, atol=1e-4)


def test_pcm_constant_seed_unchanged():
    s = torch.rand(2, 21, 1, 1, generator=_g(5)).expand(2, 21, 4, 4).contiguous()
    a = P.pcm_affinity(torch.randn(2, 12, 4, 4, generator=_g(6)))
    assert torch.allclose(P.pcm_refine(s, a), s, atol=1e-4)


def test_pcm_head_grads_only_into_head():
    head = P.PCMHead(c4=8, c5=16)
    img = torch.randn(1, 3, 32, 32, generator=_g(7))
    c4 = torch.randn(1, 8, 4, 4, generator=_g(8), requires_grad=True)
    c5 = torch.randn(1, 16, 4, 4, generator=_g(9), requires_grad=True)
    cam = torch.randn(1, 21, 4, 4, generator=_g(10), requires_grad=True)
    out = head(img, c4, c5, cam)
    assert out.shape == (1, 21, 4, 4)
    out.sum().backward()
    assert c4.grad is None and c5.grad is None and cam.grad is None
    assert head.f9.weight.grad is not None and head.f8_3.weight.grad is not None


# ---------------------------------------------------------------------------------------------------- SEAM losses


def test_amp_loss():
    assert P.amp_loss(-torch.rand(2, 20, 4, 4, generator=_g(11))).item() == 0.0
    x = torch.randn(2, 20, 4, 4, generator=_g(12))
    m = x.max(1).values.reshape(2, -1)
    exp = torch.stack([F.relu(torch.sort(r).values[:4]) for r in m]).mean()
    assert torch.allclose(P.amp_loss(x), exp)


def _ramp(n, c, h, w):
    """Bilinear-resize-equivariant toy map: affine in the (align_corners) normalised coordinates."""
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    a = torch.arange(1, c + 1, dtype=torch.float32).view(1, c, 1, 1)
    return (a * xx + (c - a) * yy + 0.1 * a).expand(n, c, h, w)


@pytest.mark.parametrize("bg_index", [0, -1])
def test_er_zero_for_equivariant_map(bg_index):
    label = torch.tensor([[1.0] * 10 + [0.0] * 10])
    cam1, cam2 = _ramp(1, 21, 32, 32), _ramp(1, 21, 16, 16)
    loss, c1, c2 = P.er_loss(cam1, cam2, label, bg_index)
    assert loss.item() < 1e-5
    assert c1.shape == c2.shape == (1, 21, 16, 16)
    b = bg_index % 21
    fg = [i for i in range(21) if i != b]
    assert torch.allclose(c2[:, b], 1 - c2[:, fg].max(1).values)
    loss_r, _, _ = P.er_loss(torch.randn(1, 21, 32, 32, generator=_g(13)), cam2, label, bg_index)
    assert loss_r.item() > 1e-3


def test_ecr_zero_when_rv_equals_onehot():
    g = _g(14)
    label = torch.ones(1, 20)
    cls = torch.cat([torch.arange(20), torch.randint(0, 20, (44,), generator=g)])
    cam = F.one_hot(cls, 21).float().T.reshape(1, 21, 8, 8).roll(1, dims=1)  # fg one-hot in 1:, bg 0 = 0
    cam = cam * 5.0
    _, c1, c2 = P.er_loss(cam, cam, label, 0)
    rv = P.max_onehot(c2, slice(1, None))
    assert P.ecr_loss(c1, c2, rv, rv, label, 0).item() < 1e-4
    rnd = torch.rand(1, 21, 8, 8, generator=g)
    assert P.ecr_loss(c1, c2, rnd, rnd, label, 0).item() > 1e-2


def test_max_onehot_channels_and_esp_bug():
    x = torch.tensor([3.0, 1.0, 2.0, 5.0]).view(1, 4, 1, 1)  # bg last = 5.0
    assert P.onehot_channels(4, -1, esp_onehot_bug=True) == slice(1, None)
    assert P.onehot_channels(4, -1, esp_onehot_bug=False) == slice(0, 3)
    assert P.onehot_channels(4, 0) == slice(1, None)
    bug = P.max_onehot(x, P.onehot_channels(4, -1, True)).flatten().tolist()
    assert bug == [3.0, 0.0, 0.0, 5.0]  # class 0 untouched, bg counted (replicated upstream bug)
    fixed = P.max_onehot(x, P.onehot_channels(4, -1, False)).flatten().tolist()
    assert fixed == [3.0, 0.0, 0.0, 5.0]  # fg max (class 0) kept, bg untouched
    y = torch.tensor([1.0, 4.0, 2.0, 5.0]).view(1, 4, 1, 1)
    assert P.max_onehot(y, P.onehot_channels(4, -1, True)).flatten().tolist() == [1.0, 0.0, 0.0, 5.0]
    assert P.max_onehot(y, P.onehot_channels(4, -1, False)).flatten().tolist() == [0.0, 4.0, 0.0, 5.0]
    assert x.flatten().tolist() == [3.0, 1.0, 2.0, 5.0]  # not in place


def test_cls_loss_runs_and_backprops():
    cam = torch.randn(2, 21, 8, 8, generator=_g(15), requires_grad=True)
    label = (torch.rand(2, 20, generator=_g(16)) > 0.5).float()
    loss = P.cls_loss(cam, cam[:, :, :4, :4], cam, cam, label, 0)
    loss.backward()
    assert torch.isfinite(loss) and cam.grad is not None


# ---------------------------------------------------------------------------------------------------- prototypes / contrast


def test_prototype_is_masked_mean():
    g = _g(17)
    feat = torch.randn(1, 8, 4, 4, generator=g)
    cam = torch.zeros(1, 3, 4, 4)
    masks = {0: [0, 5, 6], 1: [1, 2, 3], 2: [15, 10, 7]}
    for c, pix in masks.items():
        cam.view(1, 3, 16)[0, c, pix] = 1.0
    protos = P.prototypes(cam, feat, k=3)
    fl = feat.view(8, 16)
    for c, pix in masks.items():
        acc = torch.zeros(8)
        for i in pix:
            acc += fl[:, i]
        exp = acc / len(pix)
        exp = exp / exp.norm()
        assert torch.allclose(protos[c], exp, atol=1e-6)


def test_prototype_weighted_topk_over_batch():
    g = _g(18)
    n, c, h, w, d, k = 2, 4, 3, 3, 5, 4
    cam = torch.rand(n, c, h, w, generator=g)
    feat = torch.randn(n, d, h, w, generator=g)
    protos = P.prototypes(cam, feat, k=k)
    for ch in range(c):
        items = [(cam[b, ch, i, j].item(), feat[b, :, i, j]) for b in range(n) for i in range(h) for j in range(w)]
        items.sort(key=lambda t: -t[0])
        top = items[:k]
        num = sum(v * f for v, f in top)
        exp = num / sum(v for v, _ in top)
        assert torch.allclose(protos[ch], exp / exp.norm(), atol=1e-5)


def _ref_norm_cam(cam, bg_thr, bg_index=-1, eps=1e-5):
    """numpy transcription of the contrast-loss CAM normalisation of ``usr922/wseg@esp``
    ``module/train.py::get_contrast_loss`` (relu; x[x < min+eps] = 0; (x-min-eps)/(max-min+eps); bg := bg_thr)."""
    x = np.maximum(cam.astype(np.float32), 0)
    mn = x.min(axis=(2, 3), keepdims=True)
    mx = x.max(axis=(2, 3), keepdims=True)
    x = np.where(x < mn + np.float32(eps), np.float32(0), x)
    out = (x - mn - np.float32(eps)) / (mx - mn + np.float32(eps))
    out[:, bg_index] = bg_thr
    return out


def _ref_prototypes_all(norm_cam, feat):
    """numpy reference prototypes with k = N·h·w (every pixel is in the top-k, so ties cannot matter):
    ``P[c] = Σ w·f / Σ w`` (plain sum, no clamp), then l2 normalisation."""
    c = norm_cam.shape[1]
    wts = norm_cam.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)      # (C, M)
    f = feat.transpose(0, 2, 3, 1).reshape(-1, feat.shape[1]).astype(np.float64)  # (M, D)
    proto = (wts @ f) / wts.sum(1, keepdims=True)
    return proto / np.linalg.norm(proto, axis=1, keepdims=True)


def _zero_class_batch(seed=5):
    """N=2, C=4 (bg last), 4x4, D=3; class 1 is <= 0 before relu in every image of both views."""
    g = _g(seed)
    n, c, h, w, d = 2, 4, 4, 4, 3
    cam1 = torch.randn(n, c, h, w, generator=g)
    cam2 = torch.randn(n, c, h, w, generator=g)
    cam1[:, 1] = -torch.rand(n, h, w, generator=g)
    cam2[:, 1] = 0.0
    f1 = torch.randn(n, d, h, w, generator=g)
    f2 = torch.randn(n, d, h, w, generator=g)
    label = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    return cam1, f1, cam2, f2, label


def test_prototype_of_a_class_zero_in_every_image_is_the_plus_mean_as_upstream():
    # usr922/wseg@esp module/train.py::get_contrast_loss: a zero map normalises to -1 everywhere, so
    # P = sum(-1 * f) / sum(-1) = +mean(f); a denominator clamped at 1e-5 flipped it to -mean(f).
    cam, feat, _, _, _ = _zero_class_batch()
    nc_ref = _ref_norm_cam(cam.numpy(), 0.10)
    assert (nc_ref[:, 1] == -1.0).all()                            # (0 - 0 - 1e-5) / (0 - 0 + 1e-5)
    nc = P.contrast_norm_cam(cam, 0.10, -1)
    np.testing.assert_array_equal(nc.numpy(), nc_ref)
    m = 2 * 4 * 4
    exp = _ref_prototypes_all(nc_ref, feat.numpy())
    got = P.prototypes(nc, feat, k=m).numpy()
    np.testing.assert_allclose(got, exp, atol=1e-5)
    mean = feat.numpy().transpose(0, 2, 3, 1).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(got[1], mean / np.linalg.norm(mean), atol=1e-6)  # +mean, not -mean
    # the switch gives the same prototype here (all weights equal: plain mean of the top-k features)
    np.testing.assert_allclose(P.prototypes(nc, feat, k=m, safe_denominator=True).numpy()[1], got[1], atol=1e-6)


def test_prototype_of_a_zero_class_points_along_the_features_with_ties_in_the_topk():
    # k < N·h·w: which tied pixels torch.topk picks is implementation-defined, but with features in the positive
    # orthant the reference prototype (a +mean of some of them) is positive; the old clamp made it negative.
    g = _g(31)
    cam = torch.rand(3, 5, 4, 4, generator=g)
    cam[:, 2] = 0.0
    feat = torch.rand(3, 6, 4, 4, generator=g) + 0.1
    nc = P.contrast_norm_cam(cam, 0.10, -1)
    for safe in (False, True):
        assert (P.prototypes(nc, feat, k=3, safe_denominator=safe)[2] > 0).all()


def test_prototype_zero_and_mixed_weight_sums_reference_and_safe_switch():
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]).T.reshape(1, 2, 2, 2)  # 4 pixels
    f = feat.reshape(2, 4).T.numpy().astype(np.float64)
    w = np.array([1.0, 0.5, -1.0, -1.0])                           # sum -0.5: mixed signs
    nc = torch.stack([torch.zeros(4), torch.tensor(w, dtype=torch.float32)]).reshape(1, 2, 2, 2)
    ref = P.prototypes(nc, feat, k=4)
    assert not torch.isfinite(ref[0]).any()                        # 0 / 0, as upstream
    exp = (w @ f) / w.sum()
    np.testing.assert_allclose(ref[1].numpy(), exp / np.linalg.norm(exp), atol=1e-6)
    safe = P.prototypes(nc, feat, k=4, safe_denominator=True)
    assert torch.isfinite(safe).all()
    mean = f.mean(0)                                               # no positive weight: plain mean
    np.testing.assert_allclose(safe[0].numpy(), mean / np.linalg.norm(mean), atol=1e-6)
    conv = (np.maximum(w, 0) @ f) / np.maximum(w, 0).sum()         # convex weights (1, 0.5, 0, 0) / 1.5
    np.testing.assert_allclose(safe[1].numpy(), conv / np.linalg.norm(conv), atol=1e-6)


def test_contrast_cross_terms_match_a_numpy_reference_on_a_zero_class_batch():
    """Cross-prototype and cross-pseudo-label terms against a numpy transcription of ``usr922/wseg@esp``
    ``module/train.py::get_contrast_loss`` (same-size views, k = N·h·w so that the top-k has no ties).
    The old clamped denominator gave cross_proto 0.7102 / cross_label 0.6185 here; the reference 0.4518 / 0.4639."""
    cam1, f1, cam2, f2, label = _zero_class_batch()
    m = 2 * 4 * 4
    out = P.ppc_contrast_loss(cam1, f1, cam2, f2, label, bg_index=-1, bg_thr=0.10, proto_k=m, generator=_g(0))
    lab = np.concatenate([label.numpy(), np.ones((2, 1), np.float32)], 1)[:, :, None, None]

    def view(cam, feat):
        nc = _ref_norm_cam(cam.numpy(), 0.10)
        y = (nc * lab).argmax(1).reshape(-1)
        fr = feat.numpy().transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
        return y, fr / np.linalg.norm(fr, axis=1, keepdims=True), _ref_prototypes_all(nc, feat.numpy())

    def ce(fr, proto, y):
        logits = fr @ proto.T / 0.1
        lse = np.log(np.exp(logits).sum(1))
        return float(np.mean(lse - logits[np.arange(len(y)), y]))

    (y1, fr1, p1), (y2, fr2, p2) = view(cam1, f1), view(cam2, f2)
    cross_proto = 0.1 * 0.5 * (ce(fr1, p2, y1) + ce(fr2, p1, y2))
    cross_label = 0.1 * 0.5 * (ce(fr1, p1, y2) + ce(fr2, p2, y1))
    assert out["cross_proto"].item() == pytest.approx(cross_proto, abs=1e-5)
    assert out["cross_label"].item() == pytest.approx(cross_label, abs=1e-5)
    assert cross_proto == pytest.approx(0.451808, abs=1e-5) and cross_label == pytest.approx(0.463943, abs=1e-5)
    safe = P.ppc_contrast_loss(cam1, f1, cam2, f2, label, bg_index=-1, bg_thr=0.10, proto_k=m, generator=_g(0),
                               proto_safe_denominator=True)
    assert safe["cross_proto"].item() == pytest.approx(cross_proto, abs=1e-4)  # only the -1e-5 weights differ


@pytest.mark.parametrize("bg_index", [0, -1])
def test_pseudo_labels_mask_absent(bg_index):
    nc = torch.tensor([0.1, 0.9, 0.5]).view(1, 3, 1, 1)  # channels
    label_fg = torch.tensor([[0.0, 1.0]])
    y = P.pseudo_labels(nc, label_fg, bg_index)
    # bg 0: channels [bg, c1, c2], c1 absent -> max(0.1 bg, 0.5 c2) -> 2
    # bg last: channels [c1, c2, bg], c1 absent -> max(0.9 c2, 0.5 bg) -> 1
    assert y.item() == (2 if bg_index == 0 else 1)


def test_proto_ce_hand_computation():
    f = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    s = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(10) / (math.exp(10) + math.exp(0)))
    l1 = -math.log(math.exp(10 * s) / (2 * math.exp(10 * s)))
    assert abs(P.proto_ce(f, p, y, 0.1).item() - (l0 + l1) / 2) < 1e-5
    assert torch.allclose(P.proto_ce(f, p, y, 0.1), F.cross_entropy(f @ p.T / 0.1, y))


def test_proto_ce_minimal_when_feature_is_its_prototype():
    protos = torch.eye(21, 32)
    y = torch.randint(0, 21, (50,), generator=_g(20))
    f = protos[y]
    loss = P.proto_ce(f, protos, y, 0.1)
    assert abs(loss.item() - math.log(1 + 20 * math.exp(-10))) < 1e-6
    assert loss.item() >= 0
    for s in range(3):
        f2 = F.normalize(f + 0.3 * torch.randn(f.shape, generator=_g(100 + s)), dim=1)
        assert P.proto_ce(f2, protos, y, 0.1) > loss


def _hard_pixel_loss(fi, protos, yi, tau):
    sims = [float(fi @ protos[c]) for c in range(protos.shape[0])]
    ranked = sorted(sims, reverse=True)[3:13]
    num = math.exp(sims[yi] / tau)
    den = num + sum(math.exp(s / tau) for s in ranked)
    return -math.log(num / den)


def test_hard_proto_loss_hand_computation():
    g = _g(21)
    protos = F.normalize(torch.randn(21, 6, generator=g), dim=1)
    base = F.normalize(torch.randn(3, 6, generator=g), dim=1)
    # classes 2 and 7 with two identical pixels each (-> the random / semi-hard draws do not matter); class 4 once
    f = torch.stack([base[0], base[0], base[1], base[1], base[2]])
    y = torch.tensor([2, 2, 7, 7, 4])
    l2 = _hard_pixel_loss(base[0], protos, 2, 0.1)
    l7 = _hard_pixel_loss(base[1], protos, 7, 0.1)
    got = P.hard_proto_loss(f, protos, y, 0.1, generator=_g(0))
    assert abs(got.item() - (l2 + l7) / 3) < 1e-4  # class 4 (n < 2) skipped but counted in the divisor


def test_hard_proto_loss_semi_hard_selection():
    # one class, n = 5: 2 random + semi-hard = ascending cos, keep lowest int(3.0)=3, drop first 1 -> ranks 1, 2
    protos = torch.eye(21, 4)
    ang = torch.tensor([0.1, 0.5, 0.9, 1.2, 1.4])  # decreasing cos to P_0
    f = torch.stack([torch.cos(ang), torch.sin(ang), torch.zeros(5), torch.zeros(5)], 1)
    y = torch.zeros(5, dtype=torch.long)
    pix = [_hard_pixel_loss(f[i], protos, 0, 0.1) for i in range(5)]
    gen = _g(3)
    rnd = torch.randperm(5, generator=_g(3))[:2].tolist()
    hard = [3, 2]  # ascending cos order: 4, 3, 2, 1, 0 -> keep [4, 3, 2] -> drop the first -> [3, 2]
    exp = sum(pix[i] for i in rnd + hard) / 4
    assert abs(P.hard_proto_loss(f, protos, y, 0.1, generator=gen).item() - exp) < 1e-4


@pytest.mark.parametrize("variant", [P.MASTER_DEFAULTS, P.ESP_DEFAULTS])
def test_ppc_contrast_loss_runs_and_grads(variant):
    g = _g(22)
    cam1 = torch.rand(2, 21, 8, 8, generator=g, requires_grad=True)
    cam2 = torch.rand(2, 21, 4, 4, generator=g, requires_grad=True)
    f1 = torch.randn(2, 16, 8, 8, generator=g, requires_grad=True)
    f2 = torch.randn(2, 16, 4, 4, generator=g, requires_grad=True)
    label = torch.zeros(2, 20)
    label[0, 3] = label[1, 3] = label[1, 11] = 1
    out = P.ppc_contrast_loss(cam1, f1, cam2, f2, label, bg_index=variant["bg_index"], bg_thr=variant["bg_thr"],
                              proto_div=variant["proto_div"], generator=_g(0))
    assert set(out) == {"loss", "cross_proto", "cross_label", "intra"}
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    assert torch.allclose(out["loss"], out["cross_proto"] + out["cross_label"] + out["intra"])
    out["loss"].backward()
    assert f1.grad is not None and f1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0
    assert cam1.grad is None and cam2.grad is None


def test_ppc_cross_proto_term_matches_cross_entropy():
    g = _g(23)
    cam = torch.rand(1, 21, 4, 4, generator=g)
    feat = torch.randn(1, 8, 4, 4, generator=g)
    label = torch.zeros(1, 20)
    label[0, :5] = 1
    out = P.ppc_contrast_loss(cam, feat, cam, feat, label, 0, 0.2, 8, generator=_g(0))
    nc = P.contrast_norm_cam(cam, 0.2, 0)
    y = P.pseudo_labels(nc, label, 0).reshape(-1)
    protos = P.prototypes(nc, feat, 2)
    fr = F.normalize(feat.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    exp = 0.1 * F.cross_entropy(fr @ protos.T / 0.1, y)
    assert torch.allclose(out["cross_proto"], exp, atol=1e-6)
    assert torch.allclose(out["cross_label"], exp, atol=1e-6)  # identical views


# ---------------------------------------------------------------------------------------------------- EPS


def test_eps_saliency_loss_hand():
    # K = 3 fg + bg last; 1x2 map. Class 0 present & overlaps saliency, class 1 present but not, class 2 absent.
    cam = torch.tensor([[[5.0, -5.0], [-5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]]).view(1, 4, 1, 2)
    sal = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])  # 1x4 -> nearest to 1x2: [1, 0]
    label = torch.tensor([[1.0, 1.0, 0.0]])
    p = torch.softmax(cam, 1)[0, :, 0]  # (4, 2)
    # round(p0) = [1, 0] -> iou = 1/1 > 0.4 valid; round(p1) = [0, 1] -> iou 0 invalid
    fg = p[0]
    bg = 1 - (p[3] + p[1])
    pred = 0.5 * fg + 0.5 * bg
    exp = ((pred - torch.tensor([1.0, 0.0])) ** 2).mean()
    assert torch.allclose(P.eps_saliency_loss(cam, sal, label, tau=0.4, alpha=0.5), exp, atol=1e-7)
    # tau = 1.0: class 0 becomes invalid as well (iou = 1/(1+1e-4) < 1)
    pred2 = 0.5 * 0 + 0.5 * (1 - (p[3] + p[1] + p[0]))
    exp2 = ((pred2 - torch.tensor([1.0, 0.0])) ** 2).mean()
    assert torch.allclose(P.eps_saliency_loss(cam, sal, label, tau=1.0, alpha=0.5), exp2, atol=1e-7)
    # alpha mixing
    pred3 = 0.8 * fg + 0.2 * bg
    exp3 = ((pred3 - torch.tensor([1.0, 0.0])) ** 2).mean()
    assert torch.allclose(P.eps_saliency_loss(cam, sal, label, tau=0.4, alpha=0.8), exp3, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- optimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1, bias=False)
        self.body = nn.Conv2d(4, 4, 1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc8 = nn.Conv2d(4, 21, 1, bias=True)
        self.stem.weight.requires_grad_(False)


def test_param_groups_quirk_default():
    net = _Net()
    groups = P.ppc_param_groups(net, [net.fc8], lr=0.01)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"bw", "bb", "nw", "nb"}
    assert by["bw"]["params"] == [net.body.weight] and by["nb"]["params"] == [net.fc8.bias]
    assert [by[k]["lr"] for k in ("bw", "bb", "nw", "nb")] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [by[k]["weight_decay"] for k in ("bw", "bb", "nw", "nb")] == [5e-4, 0.0, 5e-4, 0.0]
    opt = reference_sgd(groups, {"lr": 0.01}, weight_decay=5e-4)
    assert all(g["momentum"] == 5e-4 for g in opt.param_groups)  # the quirk: momentum = weight decay
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 5e-4, 0.0]  # per-group decay kept
    assert [g["name"] for g in opt.param_groups] == ["bw", "bb", "nw", "nb"]
    # cfg's weight decay wins over the default, and is also the momentum
    opt = reference_sgd(P.ppc_param_groups(net, [net.fc8], lr=0.01), {"lr": 0.01, "weight_decay": 1e-3,
                                                                      "momentum": 0.9})
    assert all(g["momentum"] == 1e-3 for g in opt.param_groups)


def test_param_groups_fix_quirk():
    net = _Net()
    opt = reference_sgd(P.ppc_param_groups(net, [net.fc8], lr=0.01), {"lr": 0.01, "fix_quirk": True},
                        weight_decay=5e-4)
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    # weight decay is applied: with zero gradients one step shrinks weights by lr*wd
    w0 = net.body.weight.detach().clone()
    b0 = net.body.bias.detach().clone()
    for prm in net.parameters():
        prm.grad = torch.zeros_like(prm)
    opt.step()
    assert torch.allclose(net.body.weight, w0 * (1 - 0.01 * 5e-4), atol=1e-9)
    assert torch.equal(net.body.bias, b0)  # biases: wd 0


def test_reference_sgd_without_the_quirk_uses_cfg_momentum():
    prm = nn.Parameter(torch.ones(3))
    opt = reference_sgd([{"params": [prm], "lr": 0.1}], {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-4},
                        quirk=False)
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["weight_decay"] == 1e-4
