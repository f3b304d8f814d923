"""Tests of the RTC loss / op core (``wsss_core.methods.rtc_ops``) against ``ChunyanWang1/RTC``
(``network/losses.py::refine_cams_with_bkg_v1``, ``contrast_train.py::balanced_mask_loss_ce``). Tiny CPU tensors
only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss_core.methods import rtc_ops as R
from wsss_core.refine.pixel import PixelRefiner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _identity(img, masks):
    return masks


# ------------------------------------------------------------------------------------------ two-threshold labels


def _block_case():
    """Image 0: class 1 (id 2) present, its cam in three 16-px column blocks 0.1 / 0.4 / 0.9 (the image a constant
    colour per block), the valid box rows 2..29, columns 0..44; absent classes 0 and 2 get large cams. Image 1 (random
    image): classes 0 and 2 present, everything valid."""
    b, k, h, w = 2, 3, 32, 48
    img = torch.rand(b, 3, h, w, generator=_g(1))
    cams = torch.zeros(b, k, h, w)
    for j, v in enumerate((0.1, 0.4, 0.9)):
        cams[0, 1, :, 16 * j:16 * (j + 1)] = v
        img[0, :, :, 16 * j:16 * (j + 1)] = torch.tensor([0.2, 0.5, 0.8]).roll(j)[:, None, None]  # a colour per block
    cams[0, 0], cams[0, 2] = 0.95, 0.99                  # absent: must never win
    cams[1, 0], cams[1, 2] = 0.9, 0.3
    label = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    valid = torch.zeros(b, 1, h, w)
    valid[0, :, 2:30, 0:45] = 1
    valid[1] = 1
    return img, cams, label, valid


@pytest.mark.parametrize("refine", [_identity, PixelRefiner("varm", n_iter=0)])
def test_two_threshold_blocks(refine):
    img, cams, label, valid = _block_case()
    seg = R.two_threshold_labels(img, cams, label, valid, refine)
    assert seg.shape == (2, 32, 48) and seg.dtype == torch.long
    s = seg[0]
    assert (s[2:30, 0:13] == 0).all()          # 0.1: bg at both levels
    assert (s[2:30, 19:29] == 255).all()       # 0.4: fg at the low level only -> ignored
    assert (s[2:30, 35:45] == 2).all()         # 0.9: class 1 -> id 2
    assert (s[:2] == 255).all() and (s[30:] == 255).all() and (s[:, 45:] == 255).all()
    assert set(s.unique().tolist()) <= {0, 2, 255}
    assert (seg[1] == 1).all()                 # class 0 (0.9) beats the 0.55 bg; class 2 (0.3) never wins


def test_two_threshold_with_varm_and_no_valid():
    """VARM on the block image: the affinity between blocks of different colours is ~0, so the block interiors keep
    their labels; without a valid map everything is inside."""
    img, cams, label, _ = _block_case()
    seg = R.two_threshold_labels(img, cams, label, None, PixelRefiner("varm", n_iter=10))
    assert set(seg[0].unique().tolist()) <= {0, 2, 255}
    assert (seg[0, :, 0:13] == 0).all() and (seg[0, :, 19:29] == 255).all() and (seg[0, :, 35:] == 2).all()


def test_two_threshold_rejects_non_box_valid():
    img, cams, label, valid = _block_case()
    valid[0, 0, 5, 5] = 0
    with pytest.raises(ValueError, match="axis-aligned box"):
        R.two_threshold_labels(img, cams, label, valid, _identity)
    with pytest.raises(ValueError):
        R.two_threshold_labels(img, cams, label[:, :2], valid, _identity)


def test_two_threshold_empty_valid_is_ignored():
    img, cams, label, valid = _block_case()
    valid[0] = 0
    seg = R.two_threshold_labels(img, cams, label, valid, _identity)
    assert (seg[0] == 255).all()


# ----------------------------------------------------------------------------------------------------- balanced CE


def _ce(logits_px, t):
    return math.log(sum(math.exp(v) for v in logits_px)) - logits_px[t]


def test_balanced_ce_hand_value():
    target = torch.tensor([[[0, 0, 1], [255, 1, 0]]])
    logits = torch.randn(1, 3, 2, 3, generator=_g(2), dtype=torch.float64)
    label = torch.tensor([[1.0, 0.0]])
    # N = 5 (ignore excluded), n_0 = 3, n_1 = 2 -> w_0 = 2/6, w_1 = 3/6; the mean divides by all 6 pixels
    w = {0: 2 / 6, 1: 3 / 6}
    total = 0.0
    for y in range(2):
        for x in range(3):
            t = int(target[0, y, x])
            if t != 255:
                total += w[t] * _ce(logits[0, :, y, x].tolist(), t)
    loss = R.balanced_ce(logits, target, label)
    assert loss.shape == ()
    assert math.isclose(float(loss), total / 6, rel_tol=1e-12)


def test_balanced_ce_zero_when_gt_class_missing_and_batch_mean():
    target = torch.tensor([[[0, 0, 1], [255, 1, 0]]]).repeat(2, 1, 1)
    logits = torch.randn(2, 3, 2, 3, generator=_g(3), requires_grad=True)
    missing = torch.tensor([[1.0, 1.0], [1.0, 1.0]])        # class 2 (id 2) is in no pseudo mask
    loss = R.balanced_ce(logits, target, missing)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    mixed = torch.tensor([[1.0, 0.0], [1.0, 1.0]])          # image 0 complete, image 1 lacks id 2
    one = R.balanced_ce(logits[:1].detach(), target[:1], mixed[:1])
    assert float(one) > 0
    assert torch.allclose(R.balanced_ce(logits.detach(), target, mixed), one / 2)


def test_balanced_ce_resizes_logits_and_checks_input():
    target = torch.randint(0, 3, (1, 8, 8), generator=_g(4))
    target[0, 0, :3] = 255
    target[0, 1, 0], target[0, 1, 1], target[0, 1, 2] = 0, 1, 2
    logits = torch.randn(1, 3, 4, 4, generator=_g(5))
    label = torch.tensor([[1.0, 1.0]])
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=True)
    assert torch.allclose(R.balanced_ce(logits, target, label), R.balanced_ce(up, target, label))
    bad = target.clone()
    bad[0, 5, 5] = 7
    with pytest.raises(ValueError):
        R.balanced_ce(up, bad, label)
    with pytest.raises(ValueError):
        R.balanced_ce(up, target, torch.ones(1, 3))
