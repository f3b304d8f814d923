"""The superpixel network (SCN) and its training losses.

Network: SpixelFCN's single-level ``SpixelNet1l_bn`` (Yang et al., CVPR 2020, fuy34/superpixel_fcn
``models/Spixel_single_layer.py``; reused by CHENDL-SHEN/ESC ``core/models/Spixel_single_layer.py``), parameter names
kept so that published checkpoints (the BSDS500 one, SP-CAM's ``Q_model_final.pth``) load as they are.

Losses (ESC ``tools/general/Q_util.py::compute_semantic_pos_loss``, ``core/loss.py::QLoss``; CHENDL-SHEN/MSA
``core/loss.py::QLoss``): the SLIC-like reconstruction loss with a one-hot content (SP-CAM: saliency > 0.2) or a
continuous one (MSA: LAB), and SP-CAM's "improved loss" on the ASAM (press + diff) from superpixel CAM labels.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

RECON_SCALE = 0.005     # SpixelFCN: "empirically better"
POS_WEIGHT = 0.003


def _conv(batch_norm: bool, cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    if batch_norm:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False), nn.BatchNorm2d(cout),
                             nn.LeakyReLU(0.1))
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=True), nn.LeakyReLU(0.1))


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=True), nn.LeakyReLU(0.1))


class SpixelNet(nn.Module):
    """SpixelFCN encoder-decoder: normalised RGB (B, 3, H, W), H and W multiples of 16 -> Q (B, 9, H, W) (softmax).

    Only ``pred_mask0`` is built (the reference's unused ``pred_mask1..3`` are skipped when a checkpoint loads).
    """

    UNUSED_KEYS = ("pred_mask1.", "pred_mask2.", "pred_mask3.")

    def __init__(self, batch_norm: bool = True):
        super().__init__()
        c = lambda cin, cout, stride=1: _conv(batch_norm, cin, cout, 3, stride)
        self.conv0a, self.conv0b = c(3, 16), c(16, 16)
        self.conv1a, self.conv1b = c(16, 32, 2), c(32, 32)
        self.conv2a, self.conv2b = c(32, 64, 2), c(64, 64)
        self.conv3a, self.conv3b = c(64, 128, 2), c(128, 128)
        self.conv4a, self.conv4b = c(128, 256, 2), c(256, 256)
        self.deconv3, self.conv3_1 = _deconv(256, 128), c(256, 128)
        self.deconv2, self.conv2_1 = _deconv(128, 64), c(128, 64)
        self.deconv1, self.conv1_1 = _deconv(64, 32), c(64, 32)
        self.deconv0, self.conv0_1 = _deconv(32, 16), c(32, 16)
        self.pred_mask0 = nn.Conv2d(16, 9, 3, 1, 1, bias=True)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, 0.1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hh, ww = x.shape[-2:]
        if hh % ops.CELL or ww % ops.CELL:
            raise ValueError(f"SCN input of size {hh}x{ww}: height and width must be multiples of {ops.CELL} "
                             f"(resize the image to the next multiple of {ops.CELL})")
        o1 = self.conv0b(self.conv0a(x))
        o2 = self.conv1b(self.conv1a(o1))
        o3 = self.conv2b(self.conv2a(o2))
        o4 = self.conv3b(self.conv3a(o3))
        o5 = self.conv4b(self.conv4a(o4))
        d = self.conv3_1(torch.cat([o4, self.deconv3(o5)], 1))
        d = self.conv2_1(torch.cat([o3, self.deconv2(d)], 1))
        d = self.conv1_1(torch.cat([o2, self.deconv1(d)], 1))
        d = self.conv0_1(torch.cat([o1, self.deconv0(d)], 1))
        return torch.softmax(self.pred_mask0(d), 1)


def load_scn(weights: Mapping[str, Any] | None, cache_dir: str | os.PathLike = "weights") -> tuple[SpixelNet, dict]:
    """An SCN with ``weights`` (a weights spec, see :mod:`wsss_core.models.weights`; ``None``: random init).

    Every parameter of the network must be in the file (a missing key or a shape mismatch raises WeightsError
    naming the file); ``module.`` prefixes are stripped; the reference's unused heads are ignored. Returns the model
    and the load report (missing / unexpected keys, source).
    """
    from ..models.weights import load_weights

    model = SpixelNet()
    report = load_weights(model, weights, cache_dir, strict=True, ignore_prefixes=SpixelNet.UNUSED_KEYS)
    return model, report


# ------------------------------------------------------------------------------------------------------------------
# losses


def xy_grid(b: int, hh: int, ww: int, like: torch.Tensor) -> torch.Tensor:
    """Raw pixel coordinates, channels (x, y): (B, 2, H, W) (ESC ``init_spixel_grid``)."""
    ys, xs = torch.meshgrid(torch.arange(hh, device=like.device, dtype=like.dtype),
                            torch.arange(ww, device=like.device, dtype=like.dtype), indexing="ij")
    return torch.stack([xs, ys])[None].expand(b, 2, hh, ww)


def reconstruction_loss(q: torch.Tensor, content: torch.Tensor, kind: str, pos_weight: float = POS_WEIGHT,
                        cell: int = ops.CELL) -> dict[str, torch.Tensor]:
    """SLIC-like reconstruction loss of ``content`` and the pixel coordinates through ``up(pool(., Q), Q)``.

    q: (B, 9, H, W); content: (B, C, H, W), a one-hot label map (``kind="onehot"``: cross-entropy
    ``-sum log(R + 1e-8) onehot / B``) or continuous features (``kind="l2"``: ``sum_p ||R - f||_2 / (B S)``).
    Position: ``sum_p ||R_xy - xy||_2 * pos_weight / (S B)``. Sums over pixels, not means. Returns
    ``{"loss", "sem", "pos"}``, each scaled by 0.005.
    """
    b, _, hh, ww = q.shape
    feat = torch.cat([content.to(q.dtype), xy_grid(b, hh, ww, q)], 1)
    rec = ops.up(ops.pool(feat, q, cell), q, cell)
    pos = torch.linalg.vector_norm(rec[:, -2:] - feat[:, -2:], dim=1).sum() / b * pos_weight / cell
    if kind == "onehot":
        sem = -(torch.log(rec[:, :-2] + 1e-8) * feat[:, :-2]).sum() / b
    elif kind == "l2":
        sem = torch.linalg.vector_norm(rec[:, :-2] - feat[:, :-2], dim=1).sum() / (b * cell)
    else:
        raise ValueError(f"reconstruction content kind must be 'onehot' or 'l2', not {kind!r}")
    return {"loss": RECON_SCALE * (sem + pos), "sem": RECON_SCALE * sem, "pos": RECON_SCALE * pos}


def superpixel_cam_labels(cam_sp: torch.Tensor, th_bg: float = 0.05, th_step: float = 0.5,
                          th_fg: float = 0.05) -> torch.Tensor:
    """Superpixel pseudo labels for the improved loss (ESC ``QLoss.forward``); ignore = C + 1.

    cam_sp: (B, C+1, h, w), channel 0 background (the superpixel-pooled stage-1 CAM) -> (B, h, w) int64. Argmax with
    the bg channel set to ``th_bg`` and to ``th_bg + th_step``; cells where the two differ, or foreground cells whose
    second fg score exceeds ``th_fg`` times the first, are ignored.
    """
    lo, hi = cam_sp.clone(), cam_sp.clone()
    lo[:, 0], hi[:, 0] = th_bg, th_bg + th_step
    y1, y2 = lo.argmax(1), hi.argmax(1)
    top2 = cam_sp[:, 1:].topk(2, dim=1).values if cam_sp.shape[1] > 2 else torch.cat(
        [cam_sp[:, 1:], torch.zeros_like(cam_sp[:, 1:])], 1)
    ignore = (y1 != y2) | ((th_fg * top2[:, 0] < top2[:, 1]) & (y1 > 0))
    return torch.where(ignore, torch.full_like(y1, cam_sp.shape[1]), y1)


def improved_loss(a: torch.Tensor, labels: torch.Tensor, ignore_index: int, relu_t: float = 0.75,
                  hom_count: int = 15) -> dict[str, torch.Tensor]:
    """SP-CAM's ASAM losses (ESC ``core/loss.py::QLoss``): press self-affinity in homogeneous regions, penalise
    affinity across label boundaries.

    a: (B, 25, h, w) ASAM; labels: (B, h, w) in 0..C with ``ignore_index`` (= C + 1), from
    :func:`superpixel_cam_labels` (no gradient). Cells outside the grid count as background (not ignore), as the
    reference pads its one-hot map. ``same_j``/``diff_j``: both labels valid and equal / different;
    ``hom = sum_j same_j > hom_count`` (self included). ``press = sum relu(A_12 - relu_t) hom / B``,
    ``diff = 2 sum_j A_j diff_j / B``. Returns ``{"press", "diff"}``.
    """
    b, h, w = labels.shape
    padded = F.pad(labels, (2, 2, 2, 2), value=0)                  # outside: background
    centre_ok = labels != ignore_index
    same, diff = [], []
    for dy, dx in ops.OFFSETS25:
        nb = padded[:, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
        ok = centre_ok & (nb != ignore_index)
        same.append(ok & (nb == labels))
        diff.append(ok & (nb != labels))
    same_t, diff_t = torch.stack(same, 1), torch.stack(diff, 1).to(a.dtype)
    hom = (same_t.sum(1) > hom_count).to(a.dtype)
    press = F.relu((a[:, ops.CENTER25] - relu_t) * hom).sum() / b
    dif = 2 * F.relu((a * diff_t).sum(1)).sum() / b
    return {"press": press, "diff": dif}


# ------------------------------------------------------------------------------------------------------------------
# model selection: GT reconstruction (ESC train_Q.py / MSA train_scn.py ``evaluate``)


def gt_reconstruction(q: torch.Tensor, gt: torch.Tensor, n_classes: int, steps: int = 20, low: int = 12,
                      ignore_index: int = 255, cell: int = ops.CELL) -> torch.Tensor:
    """How well Q and its ASAM recover object boundaries from a blurred mask.

    gt: (B, H, W) labels (``ignore_index`` counts as background), q: (B, 9, H, W) -> (B, H, W) predicted labels: the
    one-hot GT bilinearly downsampled to ``low`` x ``low`` and back, ``refine_with_q`` with ``steps`` steps, argmax.
    ``steps=0`` is the plain bilinear baseline. Score it against ``gt`` with the usual confusion matrix.
    """
    g = torch.where(gt == ignore_index, torch.zeros_like(gt), gt).long()
    onehot = F.one_hot(g, n_classes).permute(0, 3, 1, 2).to(q.dtype)
    blurred = F.interpolate(F.interpolate(onehot, size=(low, low), mode="bilinear", align_corners=False),
                            size=gt.shape[-2:], mode="bilinear", align_corners=False)
    return ops.refine_with_q(blurred, q, steps, cell=cell).argmax(1)
