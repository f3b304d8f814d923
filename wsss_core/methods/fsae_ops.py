"""FSAE (Choi et al., WACV 2025) core operations: EMA teacher, pseudo labels, losses.

Everything here follows the FSAE code ``obeychoi0120/PixMatch`` (canonical: ``module/train.py::train_ssl``,
``module/ema.py::EMA``, ``contrast_train.py`` / ``script/voc_ppc0.sh`` for the settings); the separate-ring-term
variant is from the authors' fork ``obeychoi0120/wseg`` branch ``ssl``. Paths below are in PixMatch unless noted.
This module is pure math; the method wrapper (``fsae.py``) composes it around a base method. The aligned
weak/strong views (the augmentation kit) are in :mod:`wsss_core.data.augment`.

The torch ops take their device/dtype from their inputs.

Logit layout: ``(B, C+1, h, w)`` CAM *logits* with an explicit background channel. ``bg_index=-1`` (bg last,
EPS/PPC layout of PixMatch ``network/resnet38_contrast.py``, the default) or ``bg_index=0`` (SEAM layout,
``usr922/wseg`` master).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import BLUR_KERNEL, N_STRONG_AUGS  # noqa: F401 (strong-view defaults of fsae.py's DEFAULTS)
from ..data.io import IGNORE_INDEX

# ---- hyperparameter defaults (final VOC script `script/voc_ppc0.sh` unless noted) ----
EMA_M = 0.999                   # --ema_m 0.999 (module/ema.py::EMA)
P_CUTOFF = 0.95                 # --p_cutoff 0.95 (train_ssl)
BDRY_SIZE = 3                   # --bdry_size 3 in the VOC script (argparse default 0 = off)
BDRY_CUTOFF = 0.8               # --bdry_cutoff 0.8 (wseg@ssl default and VOC script; PixMatch default 0.0)
BDRY_LAMBDA = 1.0               # --bdry_lambda 1.0 (wseg@ssl scripts)
PL_WEIGHT = 1.0                 # weight of L_pl, no ramp-up (train_ssl)


# =====================================================================================================
# EMA teacher (module/ema.py::EMA)
# =====================================================================================================

@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float = EMA_M,
                registered: set[str] | None = None) -> None:
    """The reference's EMA (``module/ema.py``) with the teacher as a separate module, in place on ``teacher`` (same
    architecture as ``student``).

    For every *registered* parameter: ``t <- m * t + (1 - m) * s`` (``EMA.update``). ``registered`` defaults to the
    student's parameters with ``requires_grad`` now. Everything else (frozen parameters and all buffers,
    e.g. BN running stats) is *copied* from the student: in the reference the teacher is the student module
    with only the shadow parameters swapped in, so those values are always the student's.
    """
    m = float(momentum)
    if registered is None:
        registered = {n for n, p in student.named_parameters() if p.requires_grad}
    t_params = dict(teacher.named_parameters())
    for n, s in student.named_parameters():
        t = t_params[n]
        if n in registered:
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        else:
            t.copy_(s.detach())
    t_bufs = dict(teacher.named_buffers())
    for n, b in student.named_buffers():
        t_bufs[n].copy_(b)


# =====================================================================================================
# Teacher pseudo labels (module/train.py::train_ssl)
# =====================================================================================================

def _fg_channels(n_total: int, bg_index: int) -> slice:
    if bg_index in (-1, n_total - 1):
        return slice(0, n_total - 1)
    if bg_index == 0:
        return slice(1, n_total)
    raise ValueError("bg_index must be 0 or -1 (last)")


def mask_absent_classes(logits: torch.Tensor, labels: torch.Tensor, bg_index: int = -1,
                        absent: str = "zero") -> torch.Tensor:
    """Class masking (``train_ssl``): fg logit channels x image labels; the bg channel is untouched.

    logits (B, C+1, h, w), labels (B, C) in {0, 1}. ``absent='zero'`` (the reference): absent classes get
    logit exactly 0; ``absent='neg_inf'``: the principled alternative (logit -inf). Differentiable."""
    n = logits.shape[1]
    fg = _fg_channels(n, bg_index)
    lab = labels.to(device=logits.device, dtype=logits.dtype)[:, :, None, None]
    if lab.shape[1] != n - 1:
        raise ValueError(f"labels have {lab.shape[1]} classes, logits {n - 1} fg channels")
    if absent == "zero":
        scale = torch.ones((logits.shape[0], n, 1, 1), device=logits.device, dtype=logits.dtype)
        scale[:, fg] = lab
        return logits * scale
    if absent == "neg_inf":
        add = torch.zeros((logits.shape[0], n, 1, 1), device=logits.device, dtype=logits.dtype)
        add[:, fg] = torch.where(lab > 0, torch.zeros_like(lab), torch.full_like(lab, float("-inf")))
        return logits + add
    raise ValueError("absent must be 'zero' or 'neg_inf'")


def confident_mask(probs: torch.Tensor, p_cutoff: float = P_CUTOFF) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """probs (B, K, h, w) softmax over bg+fg -> (conf, argmax, M_conf) each (B, h, w); ``M_conf = conf >= p``
    (inclusive, as ``conf_value.ge(args.p_cutoff)`` in ``train_ssl``)."""
    conf, pseudo = probs.max(dim=1)
    return conf, pseudo, conf >= p_cutoff


def dilate(mask: torch.Tensor, size: int = BDRY_SIZE) -> torch.Tensor:
    """Binary dilation of (B, h, w) bool with ``ones(size x size)``, 1 iteration, equal to ``cv2.dilate``
    (anchor at ``size // 2``; outside the image counts as background)."""
    if size <= 1:
        return mask.clone()
    a = size // 2
    x = F.pad(mask[:, None].float(), (a, size - 1 - a, a, size - 1 - a), value=0.0)
    # cv2 dilation: dst(y, x) = max over kernel offsets (i - a) of src(y + i - a, x + j - a)
    return F.max_pool2d(x, kernel_size=size, stride=1)[:, 0] > 0.5


def boundary_ring(mask_fg: torch.Tensor, conf: torch.Tensor, size: int = BDRY_SIZE,
                  cutoff: float = BDRY_CUTOFF) -> torch.Tensor:
    """Spatial expansion (``train_ssl``, ``--bdry``): ``R = (dilate(M_fg, size) - M_fg) AND (conf >= cutoff)``,
    (B, h, w) bool."""
    return dilate(mask_fg, size) & ~mask_fg & (conf >= cutoff)


@torch.no_grad()
def teacher_pseudo_labels(logits_w: torch.Tensor, labels: torch.Tensor, p_cutoff: float = P_CUTOFF,
                          bdry: bool = True, bdry_size: int = BDRY_SIZE, bdry_cutoff: float = BDRY_CUTOFF,
                          bg_index: int = -1, absent: str = "zero") -> dict[str, torch.Tensor]:
    """Hard pseudo labels from the teacher's weak-view CAM logits (``train_ssl``).

    logits_w (B, C+1, h, w) raw logits (no upsampling), labels (B, C). Returns (all (B, h, w)):
      ``probs`` (B, C+1, h, w), ``conf``, ``pseudo`` (argmax, may be bg or fg), ``mask_conf`` (conf >= p),
      ``mask_fg`` (max fg prob >= p), ``ring`` (R, empty when ``bdry`` is off), ``mask`` (PixMatch union
      ``M_conf | R``), and int64 targets with 255 elsewhere: ``target`` (union mask), ``target_conf``
      (M_conf only), ``target_ring`` (R only).
    """
    z = mask_absent_classes(logits_w.detach(), labels, bg_index=bg_index, absent=absent)
    probs = torch.softmax(z, dim=1)
    conf, pseudo, m_conf = confident_mask(probs, p_cutoff)
    fg = _fg_channels(probs.shape[1], bg_index)
    m_fg = probs[:, fg].max(dim=1).values >= p_cutoff
    ring = boundary_ring(m_fg, conf, bdry_size, bdry_cutoff) if bdry else torch.zeros_like(m_conf)
    mask = m_conf | ring

    def tgt(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m, pseudo, torch.full_like(pseudo, IGNORE_INDEX))

    return {"probs": probs, "conf": conf, "pseudo": pseudo, "mask_conf": m_conf, "mask_fg": m_fg,
            "ring": ring, "mask": mask, "target": tgt(mask), "target_conf": tgt(m_conf), "target_ring": tgt(ring)}


# =====================================================================================================
# Losses on the strong view (module/train.py::train_ssl)
# =====================================================================================================

def pixel_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``L_pl = (1 / (B*h*w)) * sum_{valid} CE(logits[b, :, y, x], target[b, y, x])`` (``train_ssl``).

    logits (B, K, h, w), target (B, h, w) int64 with ``ignore_index`` outside the mask. Normalised by *all*
    pixels, so an empty mask gives exactly 0 (no NaN) with zero gradient."""
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not align")
    ce = F.cross_entropy(logits, target.to(device=logits.device, dtype=torch.long), ignore_index=ignore_index,
                         reduction="none")
    return ce.sum() / target.numel()


def fsae_loss(logits_s: torch.Tensor, labels: torch.Tensor, teacher: Mapping[str, torch.Tensor],
              variant: str = "union", bdry_lambda: float = BDRY_LAMBDA, pl_weight: float = PL_WEIGHT,
              bg_index: int = -1, absent: str = "zero") -> dict[str, torch.Tensor]:
    """The FSAE term on the student's strong-view CAM logits (B, C+1, h, w) (same fg x label masking,
    ``train_ssl``).

    - ``variant='union'`` (PixMatch, the canonical code, default): ``L = pl_weight * L_pl(M_conf | R)``.
    - ``variant='separate'`` (wseg@ssl): ``L = pl_weight * (L_pl(M_conf) + bdry_lambda * L_pl(R))``; ring
      pixels that are also confident count twice, so with ``bdry_lambda = 1``
      ``separate = union + L_pl(R & M_conf)`` (equal when R and M_conf are disjoint).

    ``teacher`` is the dict of :func:`teacher_pseudo_labels`. The total training loss is
    ``L_sup + loss`` (L_pl weight 1, no ramp-up). Returns ``{"loss", "loss_pl", "loss_ring", "mask_ratio",
    "ring_ratio"}`` (``loss_ring`` is 0 for the union variant; it is already inside ``loss_pl``).
    """
    z = mask_absent_classes(logits_s, labels, bg_index=bg_index, absent=absent)
    zero = z.sum() * 0.0
    if variant == "union":
        l_pl = pixel_ce(z, teacher["target"])
        l_ring = zero
        loss = pl_weight * l_pl
    elif variant == "separate":
        l_pl = pixel_ce(z, teacher["target_conf"])
        l_ring = pixel_ce(z, teacher["target_ring"])
        loss = pl_weight * (l_pl + bdry_lambda * l_ring)
    else:
        raise ValueError("variant must be 'union' or 'separate'")
    return {"loss": loss, "loss_pl": l_pl, "loss_ring": l_ring,
            "mask_ratio": teacher["mask"].float().mean().detach(),
            "ring_ratio": teacher["ring"].float().mean().detach()}
