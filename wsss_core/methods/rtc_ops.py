"""Loss / op core of RTC (representation, transform and compensator; Wang et al.) on ResNet-38.

Upstream: ``ChunyanWang1/RTC`` (a fork of ``usr922/wseg``, PPC), cited per function below. The shared SEAM / PPC
pieces (PCM, max_norm, max_onehot, ER / ECR losses, prototypes) live in :mod:`wsss_core.methods.ppc_ops`; the pixel
refinement modules (VARM, PAR, PAMR) in :mod:`wsss_core.refine.pixel`.

Everything here is pure torch; tensors are created on the device / dtype of the inputs. Shapes use B = batch,
K = number of foreground classes (20 on VOC), C = K + 1 channels with background at channel 0, H × W = the crop.
Label ids: 0 = background, k + 1 = foreground class k (channel k of a (B, K) multi-hot label), 255 = ignore.

Contents:

- Segmentation pseudo-labels: :func:`two_threshold_labels` (``network/losses.py::refine_cams_with_bkg_v1``).
- Segmentation loss: :func:`balanced_ce` (``contrast_train.py::balanced_mask_loss_ce``).
- Transform (``contrast_train.py``, inline): :func:`cross_view_prototypes` (PPC's prototypes over the other
  view's features, ties broken by position: ``ppc_ops.topk_stable``), :func:`context_feedback` (global-context feedback),
  :func:`topmean`, :func:`info_nce`, and :func:`transform_losses` (structure loss + the three InfoNCE terms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from . import ppc_ops
from .ppc_ops import topk_stable  # noqa: F401 (RTC's top-k tie rule, re-exported)

IGNORE = 255
BKG_HIGH = 0.55    # refine_cams_with_bkg_v1: bkg_h, the background level whose winners are kept as foreground
BKG_LOW = 0.20     # refine_cams_with_bkg_v1: bkg_l, the background level whose background is kept as background
DOWN_SCALE = 2     # refine_cams_with_bkg_v1(down_scale=2): the refinement runs at half size


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _valid_box(valid: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the region ``valid > 0`` of one (H, W) map, bottom / right exclusive (the
    reference's ``img_box``), or None when nothing is valid. Raises when the region is not an axis-aligned box."""
    inside = valid > 0
    rows, cols = inside.any(1).nonzero()[:, 0], inside.any(0).nonzero()[:, 0]
    if rows.numel() == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if int(inside.sum()) != (bottom - top) * (right - left):
        raise ValueError("the valid region of the crop must be an axis-aligned box (the reference's img_box); got "
                         f"{int(inside.sum())} valid pixels in a bounding box of {bottom - top}x{right - left}")
    return top, bottom, left, right


# ----------------------------------------------------------------------------------------------------------------
# segmentation pseudo-labels and loss


@torch.no_grad()
def two_threshold_labels(img: torch.Tensor, cams: torch.Tensor, label: torch.Tensor, valid: torch.Tensor | None,
                         refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], high: float = BKG_HIGH,
                         low: float = BKG_LOW) -> torch.Tensor:
    """Two-background-level, refined segmentation pseudo-labels (``ChunyanWang1/RTC``
    ``network/losses.py::refine_cams_with_bkg_v1``; ``_v2`` is identical).

    img (B, 3, H, W) RGB in [0, 1], cams (B, K, H, W) foreground maps in [0, 1], label (B, K) multi-hot, valid
    (B, 1, H, W) crop validity (> 0 inside the image part of the crop; None = all valid), refine a callable
    ``(img (1, 3, H/2, W/2), masks (1, n, H/2, W/2)) -> (1, n, H/2, W/2)`` (e.g. a
    :class:`wsss_core.refine.pixel.PixelRefiner`) -> (B, H, W) long in {0, 1..K, 255}.

    1. Image and [bg, cams] are resized to (H // 2, W // 2) (bilinear, align_corners=False), bg a constant map at
       ``high`` and at ``low``.
    2. Per image, the channels of bg and the GT classes get a softmax, are refined, resized back to (H, W)
       (bilinear, align_corners=False); the argmax is mapped to label ids (bg 0, class k -> k + 1).
    3. Inside the valid box the label is pasted, outside it is 255 (the reference's ``img_box``, here the bounding box
       of ``valid``, which must be a box).
    4. label = the high-bg label, 255 where it is bg, 0 where the low-bg label is bg as well: foreground from the
       high bg level, background only where even the low level wins, the rest ignored.

    Runs without grad (the result is an argmax).
    """
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"img must be (B, 3, H, W), got {tuple(img.shape)}")
    b, _, h, w = img.shape
    if cams.dim() != 4 or cams.shape[0] != b or tuple(cams.shape[-2:]) != (h, w):
        raise ValueError(f"cams must be (B, K, H, W) = ({b}, K, {h}, {w}), got {tuple(cams.shape)}")
    k = cams.shape[1]
    if tuple(label.shape) != (b, k):
        raise ValueError(f"label must be (B, K) = {(b, k)} for cams {tuple(cams.shape)}, got {tuple(label.shape)}")
    if valid is not None and (valid.dim() != 4 or tuple(valid.shape) != (b, 1, h, w)):
        raise ValueError(f"valid must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(valid.shape)}")
    half = (h // DOWN_SCALE, w // DOWN_SCALE)
    img_half = F.interpolate(img, size=half, mode="bilinear", align_corners=False)

    def with_bg(level: float) -> torch.Tensor:  # (B, 1 + K, H/2, W/2); bg is concatenated first, as upstream
        bg = cams.new_full((b, 1, h, w), level)
        return F.interpolate(torch.cat([bg, cams], 1), size=half, mode="bilinear", align_corners=False)

    levels = (with_bg(high), with_bg(low))
    out = torch.full((2, b, h, w), IGNORE, dtype=torch.long, device=cams.device)  # (high, low) labels
    for i in range(b):
        box = (0, h, 0, w) if valid is None else _valid_box(valid[i, 0])
        if box is None:
            continue
        keys = torch.cat([torch.zeros(1, dtype=torch.long, device=cams.device),
                          label[i].nonzero()[:, 0].to(cams.device) + 1])  # bg + GT classes, as label ids
        t, bt, lf, rt = box
        for j, maps in enumerate(levels):
            refined = refine(img_half[i:i + 1], maps[i:i + 1, keys].softmax(1))
            refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
            out[j, i, t:bt, lf:rt] = keys[refined[0].argmax(0)][t:bt, lf:rt]
    lab_high, lab_low = out
    seg = lab_high.clone()
    seg[lab_high == 0] = IGNORE
    seg[(lab_high == 0) & (lab_low == 0)] = 0
    return seg


def balanced_ce(logits: torch.Tensor, target: torch.Tensor, label: torch.Tensor,
                ignore_index: int = IGNORE) -> torch.Tensor:
    """Class-balanced cross-entropy of the segmentation branch against a pseudo mask (``ChunyanWang1/RTC``
    ``contrast_train.py::balanced_mask_loss_ce``, then ``.mean()`` over the batch).

    logits (B, C, h, w) with C = K + 1 (bg first; resized bilinearly with align_corners=True to the target size when
    it differs, as upstream), target (B, H, W) long in {0..K, ignore_index}, label (B, K) multi-hot -> scalar.

    Per image: n_c = #pixels labelled c and N = Σ_c n_c (ignore pixels excluded from both); a pixel of class c weighs
    w_c = (N - n_c) / (1 + N), an ignore pixel 0; loss = batch_w · mean over all H·W pixels of w · CE (CE ignores
    ``ignore_index``, the mean still divides by H·W). batch_w = 1 iff the number of classes present in the pseudo
    mask equals 1 + the number of GT classes, else 0 (so an image whose mask lacks a GT class contributes exactly 0).
    The result is the mean of the per-image losses.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, h, w), got {tuple(logits.shape)}")
    b, c = logits.shape[:2]
    if target.dim() != 3 or target.shape[0] != b:
        raise ValueError(f"target must be (B, H, W) with B = {b}, got {tuple(target.shape)}")
    if tuple(label.shape) != (b, c - 1):
        raise ValueError(f"label must be (B, C - 1) = {(b, c - 1)} for logits {tuple(logits.shape)}, "
                         f"got {tuple(label.shape)}")
    if target.dtype != torch.long:
        raise TypeError(f"target must be a long tensor, got {target.dtype}")
    if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
    keep = target != ignore_index
    if bool(((target < 0) | (target >= c))[keep].any()):
        raise ValueError(f"target values must be in [0, {c}) or {ignore_index}")
    t = torch.where(keep, target, torch.zeros_like(target)).flatten(1)          # (B, HW)
    keep = keep.flatten(1).to(logits.dtype)
    counts = logits.new_zeros(b, c).scatter_add_(1, t, keep)                     # n_c
    total = counts.sum(1, keepdim=True)                                          # N
    pix_w = ((total - counts) / (1 + total)).gather(1, t) * keep                 # w of each pixel, 0 if ignored
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten(1)
    batch_w = ((counts > 0).sum(1) == label.sum(1).round().long() + 1).to(logits.dtype)
    return (batch_w * (pix_w * ce).mean(1)).mean()


# ----------------------------------------------------------------------------------------------------------------
# transform: cross-view prototypes, global-context feedback, structure loss, InfoNCE (contrast_train.py, inline)


def cross_view_prototypes(norm_a: torch.Tensor, feat_b: torch.Tensor, k: int, stable: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTC's cross-view prototypes: the top-k pixels of view a's map (over the whole batch) gather view **b**'s
    features, ``P[c] = normalize(Σ_t v_t F_b[i_t] / Σ_t v_t)`` (the plain weight sum, all channels):
    :func:`wsss_core.methods.ppc_ops.prototypes` on the other view's features, ties by position when ``stable``.

    norm_a (N, C, h, w), feat_b (N, D, h, w) on the same grid -> (P (C, D), values (C, k), indices (C, k)), the
    indices over the (n, y, x)-ordered N·h·w pixels."""
    return ppc_ops.prototypes(norm_a, feat_b, k, stable=stable, return_topk=True)


@torch.no_grad()
def context_feedback(norm: torch.Tensor, feat_b: torch.Tensor, val: torch.Tensor, idx: torch.Tensor,
                     present: torch.Tensor) -> torch.Tensor:
    """Global-context feedback: for each channel c present in the batch, ``n'[c] = n[c] + softmax_t(cos(F_b,
    F_b[i_t])) @ v`` (cosine similarity of every view-b pixel to the k selected ones, softmax over the k, no
    temperature); absent channels are copied.

    norm (N, C, h, w), feat_b (N, D, h, w), val / idx (C, k) from :func:`cross_view_prototypes`, present (C,)
    bool -> (N, C, h, w)."""
    n, c, h, w = norm.shape
    f = F.normalize(feat_b.permute(0, 2, 3, 1).reshape(-1, feat_b.shape[1]).to(norm.dtype), dim=1)   # (M, D)
    att = torch.softmax(torch.einsum("md,ckd->cmk", f, f[idx]), dim=2)                                  # (C, M, k)
    ctx = torch.einsum("cmk,ck->cm", att, val).reshape(c, n, h, w).permute(1, 0, 2, 3)
    return norm + ctx * present.to(norm.dtype).view(1, c, 1, 1)


def topmean(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Mean of the largest ``int(frac · entries)`` entries of each sample, averaged over the batch. (N, ...) ->
    scalar."""
    flat = x.reshape(x.shape[0], -1)
    k = max(int(flat.shape[1] * frac), 1)
    return torch.topk(flat, k, dim=1).values.mean()


def info_nce(f: torch.Tensor, p: torch.Tensor, y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """``mean_i −log(exp(f_i·P[y_i]/τ) / Σ_c exp(f_i·P[c]/τ))`` over all C prototypes (the positive included):
    the cross-entropy of the logits f·Pᵀ/τ. f (M, D) normalised, p (C, D), y (M,) -> scalar."""
    return F.cross_entropy(f @ p.t().to(f.dtype) / tau, y.reshape(-1))


def transform_losses(cam_rv1: torch.Tensor, f_proj1: torch.Tensor, cam_rv2: torch.Tensor, f_proj2: torch.Tensor,
                     c1: torch.Tensor, c2: torch.Tensor, label: torch.Tensor, p: Mapping[str, Any]
                     ) -> dict[str, torch.Tensor]:
    """The "transform" half of ``contrast_train.py``: structure loss and the three InfoNCE terms.

    cam_rv1 (N, C, h1, w1), f_proj1 (N, D, h1, w1): view 1's FCM output and projected features at stride 8;
    cam_rv2, f_proj2 (N, ·, h, w): view 2's; c1, c2 (N, C, s, s): the max-normed, label-masked CAMs of the ER loss
    (bg overwritten, with gradient). ``p``: ``bg_thr``, ``proto_div``, ``tau``, ``nce_weight``, ``struct_topk``,
    ``stable_topk``. View 1 is brought to view 2's grid (bilinear, align_corners; gradient flows through the
    feature resize). Returns ``{"loss_struct", "loss_nce", "intra", "cross_label", "cross_proto"}``.
    """
    size = cam_rv2.shape[-2:]
    f1 = ppc_ops.resize(f_proj1, size)
    yt = ppc_ops.label_with_bg(label, 0)[:, :, None, None]
    with torch.no_grad():
        n1 = ppc_ops.contrast_norm_cam(ppc_ops.resize(cam_rv1.detach(), size), p["bg_thr"], 0)
        n2 = ppc_ops.contrast_norm_cam(cam_rv2.detach(), p["bg_thr"], 0)
        y1, y2 = ppc_ops.pseudo_labels(n1, label, 0), ppc_ops.pseudo_labels(n2, label, 0)
        k = (size[0] * size[1]) // int(p["proto_div"])
        p1, v1, i1 = cross_view_prototypes(n1, f_proj2, k, bool(p["stable_topk"]))
        p2, v2, i2 = cross_view_prototypes(n2, f1.detach(), k, bool(p["stable_topk"]))
        present = yt.sum(0).flatten() > 0
        r1 = context_feedback(n1, f_proj2.detach(), v1, i1, present)
        r2 = context_feedback(n2, f1.detach(), v2, i2, present)
    fg = slice(1, None)
    s = c1.shape[-2:]
    r1 = ppc_ops.resize(ppc_ops.max_norm(r1), s) * yt
    r2 = ppc_ops.resize(ppc_ops.max_norm(r2), s) * yt
    frac = float(p["struct_topk"])
    l_struct = (topmean((ppc_ops.max_onehot(r1, fg) - ppc_ops.max_onehot(c1, fg)).abs()[:, fg], frac)
                + topmean((ppc_ops.max_onehot(r2, fg) - ppc_ops.max_onehot(c2, fg)).abs()[:, fg], frac))
    g1, g2 = ppc_ops.flat_features(f1), ppc_ops.flat_features(f_proj2)
    y1, y2 = y1.reshape(-1), y2.reshape(-1)
    tau, wgt = float(p["tau"]), float(p["nce_weight"])
    intra = wgt * 0.5 * (info_nce(g1, p1, y1, tau) + info_nce(g2, p2, y2, tau))
    cross_label = wgt * 0.5 * (info_nce(g1, p1, y2, tau) + info_nce(g2, p2, y1, tau))
    cross_proto = wgt * 0.5 * (info_nce(g1, p2, y1, tau) + info_nce(g2, p1, y2, tau))
    return {"loss_struct": l_struct, "loss_nce": intra + cross_label + cross_proto, "intra": intra,
            "cross_label": cross_label, "cross_proto": cross_proto}
