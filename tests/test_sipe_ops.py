"""SIPE op core (``chenqi1126/SIPE`` ``network/resnet50_SIPE.py::Net``: norm_cam, get_seed, get_prototype,
reactivate; GSC loss of ``train_resnet50_SIPE.py::train``), on tiny CPU tensors."""

from __future__ import annotations

import torch

from wsss_core.methods import sipe_ops as ops


def _two_clusters():
    """6 pixels (2 x 3): A = row 0 with feature e0, B = row 1 with feature e1 (orthogonal)."""
    feat = torch.zeros(1, 4, 2, 3)
    feat[0, 0, 0] = 1.0
    feat[0, 1, 1] = 1.0
    a = torch.zeros(2, 3)
    a[0] = 1
    cams = torch.stack([1 - a, a])[None]  # bg = indicator of B, fg = indicator of A
    return cams, feat, a


def test_seed_iou_two_orthogonal_clusters():
    cams, feat, a = _two_clusters()
    iou = ops.seed_iou(cams, feat)
    # (the 1e-5 in the feature normalisation keeps the correlation at 0.99998, not 1)
    torch.testing.assert_close(iou[0, 1], a, atol=1e-4, rtol=0)               # IoU_fg = 1 on A, 0 on B
    torch.testing.assert_close(iou[0, 0], 0.5 * (1 - a), atol=1e-4, rtol=0)   # IoU_bg(B) = 1, x 0.5
    seeds = ops.structure_seeds(cams, feat, torch.ones(1, 2, 1, 1))
    assert torch.equal(seeds[0, 1], a) and torch.equal(seeds[0, 0], 1 - a)


def test_seed_iou_matmul_equals_broadcast_reference_form():
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(2, 5, 4, 3, generator=g)
    feat = torch.randn(2, 7, 4, 3, generator=g)
    f = feat / (feat.norm(dim=1, keepdim=True) + 1e-5)
    f = f.reshape(2, 7, 12)
    s = torch.relu(torch.einsum("ndi,ndj->nij", f, f))          # (N, hw, hw)
    m = cams.reshape(2, 5, 1, 12)
    inter = (s[:, None] * m).sum(-1)                              # the reference's [N, C, hw, hw] tensor
    union = s.sum(-1)[:, None] + m.sum(-1) - inter
    ref = (inter / union).reshape(2, 5, 4, 3)
    ref[:, 0] *= 0.5
    torch.testing.assert_close(ops.seed_iou(cams, feat), ref, atol=1e-6, rtol=0)


def test_absent_class_never_gets_a_seed():
    cams, feat, a = _two_clusters()
    mask = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # the fg class is absent
    seeds = ops.structure_seeds(cams, feat, mask)
    assert seeds[0, 1].sum() == 0 and torch.equal(seeds[0, 0], 1 - a)


def test_prototype_is_cam_scale_invariance_zero_seed_and_shared_feature():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 6, 4, 4, generator=g)
    v = torch.randn(6, generator=g)
    feat[0, :, :2, :2] = v[:, None, None]
    seeds = torch.zeros(1, 3, 4, 4)
    seeds[0, 1, :2, :2] = 1          # class 1 seeded only on pixels with feature v
    seeds[0, 0, 3, 3] = 1
    p = ops.prototypes(seeds, feat)
    torch.testing.assert_close(p[0, 1], v * 4 / 16)  # masked sum / (h w)
    cam = ops.is_cam(feat, p)
    assert cam.shape == (1, 3, 4, 4) and (cam >= 0).all() and (cam <= 1 + 1e-6).all()
    torch.testing.assert_close(cam[0, 1, :2, :2], torch.ones(2, 2), atol=1e-5, rtol=0)
    assert cam[0, 2].abs().sum() == 0                # no seed -> zero prototype -> zero IS-CAM
    p_by_count = torch.einsum("nchw,ndhw->ncd", seeds, feat) / seeds.sum((2, 3)).clamp(min=1)[..., None]
    torch.testing.assert_close(ops.is_cam(feat, p_by_count), cam)  # the divisor does not matter


def test_norm_cam_and_gsc():
    g = torch.Generator().manual_seed(2)
    cam = torch.randn(2, 4, 5, 6, generator=g) + 0.5
    nc = ops.norm_cam(cam)
    assert nc.shape == (2, 5, 5, 6)
    assert (nc[:, 1:].amax((2, 3)) >= 0.9999).all()
    torch.testing.assert_close(nc[:, 0], 1 - nc[:, 1:].amax(1))
    # GSC is zero when the CAM equals the max-normalised IS-CAM, positive otherwise
    iscam = torch.rand(2, 5, 5, 6, generator=g)
    target = iscam / (iscam.amax((2, 3), keepdim=True) + 1e-5)
    assert ops.gsc_loss(target, iscam) == 0
    assert ops.gsc_loss(nc, iscam) > 0
    # a mask zeroes absent classes (and the padding)
    mask = torch.ones(2, 5, 1, 1)
    mask[0, 3] = 0
    assert ops.norm_cam(cam, mask)[0, 3].abs().sum() == 0
