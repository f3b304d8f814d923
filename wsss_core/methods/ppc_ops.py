"""Loss / op core of PPC (pixel-to-prototype contrast, Du et al. CVPR 2022) on ResNet-38.

Upstream: ``usr922/wseg`` (branch ``master``: ``contrast_train.py``, ``network/resnet38_contrast.py``; branch ``esp``:
``module/train.py``, ``eps.py``, ``util/torchutils.py``), cited per function below. Two variants are supported through
``bg_index``:

- SEAM+PPC (``usr922/wseg`` master): background is **channel 0** (``bg_index=0``), CAM = [bg, c1..c20];
- EPS+PPC (``usr922/wseg@esp``, FSAE's ``base`` mode): background is the **last channel** (``bg_index=-1``).

Everything here is pure torch; tensors are created on the device / dtype of the inputs. Shapes use
N = batch, C = number of CAM channels incl. background (21 on VOC), K = C - 1 foreground classes,
D = feature channels, h × w = map size, M = N·h·w pixel rows.

Contents:

- CAM normalisations: :func:`max_norm` (esp ``module/train.py::max_norm``), :func:`contrast_norm_cam` (contrast-loss
  CAM normalisation), :func:`pcm_seed` (the ``Net.PCM`` seed).
- PCM: :func:`pcm_affinity`, :func:`pcm_refine`, :func:`pcm` and the :class:`PCMHead` layers
  (``network/resnet38_contrast.py::Net``).
- SEAM losses: :func:`amp_loss`, :func:`cls_loss`, :func:`max_onehot`, :func:`er_loss`, :func:`ecr_loss` (master
  ``contrast_train.py``; esp ``module/train.py``).
- Pixel-to-prototype contrast: :func:`pseudo_labels`, :func:`prototypes`, :func:`proto_ce`,
  :func:`hard_proto_loss`, :func:`ppc_contrast_loss` (master ``contrast_train.py``, inline;
  esp ``module/train.py::get_contrast_loss``).
- EPS saliency loss: :func:`eps_saliency_loss` (esp ``eps.py::get_eps_loss``).
- Optimizer groups: :func:`ppc_param_groups` (``PolyOptimizer`` of master ``tool/torchutils.py`` / esp
  ``util/torchutils.py``; the SGD with the momentum quirk is
  :func:`wsss_core.engine.optim.reference_sgd`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5  # the 1e-5 used throughout the upstream code (PCM, max_norm, contrast loss)

# Variant defaults (master contrast_train.py; esp module/train.py::train_contrast and script/script_contrast.sh).
MASTER_DEFAULTS: dict[str, Any] = {
    "bg_index": 0,          # bg is channel 0 in master
    "bg_thr": 0.20,         # master --bg_threshold 0.20: bg channel constant
    "proto_div": 8,         # master: prototype top-k k = (h·w)//8
    "tau": 0.1,             # temperature τ = 0.1 (hard-coded / 0.1)
    "gamma": 0.1,           # γ = 0.1 (esp train_contrast: gamma = 0.10)
    "ecr_topk": 0.2,        # ECR top-k: k = int(21·h·w·0.2)
    "view2_size": 128,      # second view is 128×128
    "proto_safe_denominator": False,  # False: prototype = Σ w·f / Σ w, the sum may be ≤ 0 (reference quirk)
}
ESP_DEFAULTS: dict[str, Any] = {
    **MASTER_DEFAULTS,
    "bg_index": -1,         # bg last in esp / FSAE
    "bg_thr": 0.10,         # esp train_contrast: get_contrast_loss(..., bg_thres=0.10)
    "proto_div": 16,        # esp get_contrast_loss: k = hw//16
    "eps_tau": 0.4,         # esp L_sal: τ_eps = 0.4 (script_contrast.sh --tau 0.4)
    "eps_alpha": 0.5,       # esp L_sal: α = 0.5 (argparse default)
    "esp_onehot_bug": True,  # esp max_onehot acts on channels 1: even with bg last (replicated)
}
OPTIM_DEFAULTS: dict[str, Any] = {
    "weight_decay": 5e-4,   # PolyOptimizer weight groups
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _bg(bg_index: int, c: int) -> int:
    """Non-negative background channel index for ``c`` channels."""
    return bg_index % c


def _fg_index(bg_index: int, c: int, device) -> torch.Tensor:
    """LongTensor of the ``c - 1`` foreground channel indices (in order)."""
    b = _bg(bg_index, c)
    return torch.tensor([i for i in range(c) if i != b], device=device, dtype=torch.long)


def label_with_bg(label: torch.Tensor, bg_index: int = 0) -> torch.Tensor:
    """(N, K) multi-hot fg labels -> ỹ (N, K+1) with a 1 for bg at channel ``bg_index`` (0 or -1 / K)."""
    ones = torch.ones_like(label[:, :1])
    return torch.cat([ones, label], 1) if _bg(bg_index, label.shape[1] + 1) == 0 else torch.cat([label, ones], 1)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=True (the resize used for the cross-view maps in the ER/ECR and contrast losses).
    (N,C,h,w) -> (N,C,*size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    return flat.min(-1).values.view(n, c, 1, 1), flat.max(-1).values.view(n, c, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# CAM normalisations


def max_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``max_norm`` (master ``tool/visualization.py``, esp ``module/train.py``): ``relu(x)``, then per (n, c)
    ``relu(x − min − eps) / (max − min + eps)``.

    (N, C, h, w) -> (N, C, h, w) in [0, 1); differentiable.
    """
    x = F.relu(x)
    mn, mx = _minmax(x)
    return F.relu(x - mn - eps) / (mx - mn + eps)


@torch.no_grad()
def contrast_norm_cam(cam: torch.Tensor, bg_thr: float, bg_index: int = 0, eps: float = EPS) -> torch.Tensor:
    """Contrast-loss CAM normalisation (no grad; esp ``module/train.py::get_contrast_loss``): normalised CAM Ĉ used for
    pseudo labels and prototypes.

    ``x = relu(cam)``; per (n, c) with min/max of x: ``x[x < min+eps] = 0``; ``Ĉ = (x − min − eps)/(max − min + eps)``
    (minimum pixels end up slightly negative, as upstream); not label-masked; bg channel := ``bg_thr``.
    (N, C, h, w) -> (N, C, h, w), detached.
    """
    x = F.relu(cam.detach())
    mn, mx = _minmax(x)
    x = torch.where(x < mn + eps, torch.zeros_like(x), x)
    out = (x - mn - eps) / (mx - mn + eps)
    out[:, _bg(bg_index, out.shape[1])] = bg_thr
    return out


def max_onehot(x: torch.Tensor, channels: slice | torch.Tensor) -> torch.Tensor:
    """``max_onehot`` (master ``contrast_train.py``, esp ``module/train.py``): among ``channels`` keep only values equal
    to their per-pixel max; others -> 0.

    ``channels`` is a slice or an index tensor over dim 1. (N, C, h, w) -> new tensor (N, C, h, w).
    """
    out = x.clone()
    sub = out[:, channels]
    sub = torch.where(sub == sub.max(1, keepdim=True).values, sub, torch.zeros_like(sub))
    out[:, channels] = sub
    return out


def onehot_channels(c: int, bg_index: int, esp_onehot_bug: bool = True) -> slice:
    """Channels ``max_onehot`` acts on: the fg channels, except with the esp bug (bg last) it is ``1:`` (esp
    ``module/train.py::max_onehot``)."""
    b = _bg(bg_index, c)
    if b == 0 or esp_onehot_bug:
        return slice(1, None)
    return slice(0, c - 1)


# ----------------------------------------------------------------------------------------------------------------
# PCM (network/resnet38_contrast.py::Net.PCM, master and esp)


@torch.no_grad()
def pcm_seed(cam: torch.Tensor, bg_index: int = 0, eps: float = EPS) -> torch.Tensor:
    """PCM input of ``network/resnet38_contrast.py::Net.forward`` (no grad): seed S from the detached CAM.

    ``relu(cam − eps) / (max_hw relu(cam) + eps)`` per channel; bg := 1 − max_fg; at each pixel every fg channel
    but the fg argmax is zeroed (no label masking). (N, C, h, w) -> (N, C, h, w).
    """
    cam = cam.detach()
    n, c = cam.shape[:2]
    s = F.relu(cam - eps) / (F.relu(cam).reshape(n, c, -1).max(-1).values.view(n, c, 1, 1) + eps)
    b = _bg(bg_index, c)
    fg = _fg_index(b, c, cam.device)
    sf = s[:, fg]
    arg = sf.argmax(1, keepdim=True)
    s[:, b] = 1.0 - sf.max(1).values
    s[:, fg] = sf * torch.zeros_like(sf).scatter_(1, arg, 1.0)
    return s


def pcm_affinity(feat: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``Net.PCM``: affinity from the f9 features.

    ``F = l2norm_per_pixel(feat)``; ``A = relu(Fᵀ F)``; each **column** normalised:
    ``A[:, j] /= Σ_i A[i, j] + eps``. (N, D, h, w) -> (N, hw, hw) with columns summing to ≈1.
    """
    n, d = feat.shape[:2]
    f = F.normalize(feat.reshape(n, d, -1), dim=1)
    a = F.relu(torch.bmm(f.transpose(1, 2), f))
    return a / (a.sum(1, keepdim=True) + eps)


def pcm_refine(seed: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
    """``Net.PCM``: ``cam_rv = S · A``, i.e. ``cam_rv[:, j] = Σ_i S[:, i] A[i, j]``.

    seed (N, C, h, w), aff (N, hw, hw) -> (N, C, h, w).
    """
    n, c, h, w = seed.shape
    return torch.bmm(seed.reshape(n, c, h * w), aff).reshape(n, c, h, w)


def pcm(cam: torch.Tensor, feat: torch.Tensor, bg_index: int = 0) -> torch.Tensor:
    """Full PCM: seed from ``cam`` (detached), affinity from ``feat`` (f9 output, gradients flow into it).

    cam (N, C, h, w), feat (N, D, h, w) -> cam_rv (N, C, h, w).
    """
    return pcm_refine(pcm_seed(cam, bg_index), pcm_affinity(feat))


class PCMHead(nn.Module):
    """The PCM layers of ``network/resnet38_contrast.py::Net``: ``f8_3`` 512→64, ``f8_4`` 1024→128 (kaiming), ``f9``
    195→192 (xavier gain 4), no bias.

    ``forward(img (N,3,H,W), conv4 (N,512,h,w), conv5 (N,1024,h,w), cam (N,C,h,w), bg_index) -> cam_rv (N,C,h,w)``.
    Backbone inputs are detached, so gradients reach only f8_3, f8_4 and f9.
    """

    def __init__(self, c4: int = 512, c5: int = 1024):
        super().__init__()
        self.f8_3 = nn.Conv2d(c4, 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(c5, 128, 1, bias=False)
        self.f9 = nn.Conv2d(3 + 64 + 128, 192, 1, bias=False)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def features(self, img: torch.Tensor, conv4: torch.Tensor, conv5: torch.Tensor) -> torch.Tensor:
        """(N, 192, h, w) f9 features (before l2 normalisation)."""
        h, w = conv4.shape[-2:]
        im = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=True)
        f = torch.cat([im, F.relu(self.f8_3(conv4.detach())), F.relu(self.f8_4(conv5.detach()))], 1)
        return self.f9(f)

    def forward(self, img, conv4, conv5, cam, bg_index: int = 0) -> torch.Tensor:
        return pcm(cam, self.features(img, conv4, conv5), bg_index)


# ----------------------------------------------------------------------------------------------------------------
# SEAM losses (master contrast_train.py; esp module/train.py)


def amp_loss(x: torch.Tensor) -> torch.Tensor:
    """``adaptive_min_pooling_loss`` (AMP) on fg channels (N, K, h, w): per image take the per-pixel channel max, the
    k = hw//4 smallest values, ``relu`` them; mean over N·k. Returns a scalar."""
    n = x.shape[0]
    m = x.max(1).values.reshape(n, -1)
    k = max(m.shape[1] // 4, 1)
    return F.relu(torch.topk(m, k, dim=1, largest=False).values).mean()


def cls_loss(cam1, cam2, cam_rv1, cam_rv2, label, bg_index: int = 0, use_amp: bool = True) -> torch.Tensor:
    """L_cls = ½[MLSM(GAP(cam1)_fg, y) + MLSM(GAP(cam2)_fg, y)] + ½[AMP((cam_rv1·ỹ)_fg) + AMP((cam_rv2·ỹ)_fg)].

    cams (N, C, *, *), label (N, K). ``use_amp=False`` drops the AMP half. Scalar.
    """
    c = cam1.shape[1]
    fg = _fg_index(bg_index, c, cam1.device)
    yt = label_with_bg(label, bg_index)[:, :, None, None]
    loss = 0.5 * (F.multilabel_soft_margin_loss(cam1.mean((2, 3))[:, fg], label)
                  + F.multilabel_soft_margin_loss(cam2.mean((2, 3))[:, fg], label))
    if use_amp:
        loss = loss + 0.5 * (amp_loss((cam_rv1 * yt)[:, fg]) + amp_loss((cam_rv2 * yt)[:, fg]))
    return loss


def er_loss(cam1: torch.Tensor, cam2: torch.Tensor, label: torch.Tensor, bg_index: int = 0):
    """Equivariance regularisation (master ``contrast_train.py``; esp ``module/train.py::get_er_loss``).

    ``c1 = resize(MN(cam1), size(cam2))·ỹ``, ``c2 = MN(cam2)·ỹ``, ``L_er = mean |c1_fg − c2_fg|``; afterwards the bg
    channel of c1, c2 is overwritten with ``1 − max_fg``. cam1 (N,C,h1,w1), cam2 (N,C,h2,w2), label (N,K).
    Returns ``(L_er scalar, c1 (N,C,h2,w2), c2 (N,C,h2,w2))``.
    """
    c = cam1.shape[1]
    yt = label_with_bg(label, bg_index)[:, :, None, None]
    c1 = resize(max_norm(cam1), cam2.shape[-2:]) * yt
    c2 = max_norm(cam2) * yt
    fg = _fg_index(bg_index, c, cam1.device)
    loss = (c1[:, fg] - c2[:, fg]).abs().mean()
    b = _bg(bg_index, c)
    c1 = c1.clone()
    c2 = c2.clone()
    c1[:, b] = 1 - c1[:, fg].max(1).values
    c2[:, b] = 1 - c2[:, fg].max(1).values
    return loss, c1, c2


def ecr_loss(c1: torch.Tensor, c2: torch.Tensor, cam_rv1: torch.Tensor, cam_rv2: torch.Tensor, label: torch.Tensor,
             bg_index: int = 0, topk_ratio: float = 0.2, esp_onehot_bug: bool = True) -> torch.Tensor:
    """Equivariant cross regularisation (``loss_ecr`` of master ``contrast_train.py`` / esp ``train_contrast``).

    ``r1 = resize(MN(cam_rv1), size(cam_rv2))·ỹ``, ``r2 = MN(cam_rv2)·ỹ``; ``T1 = |max_onehot(c2.detach()) − r1|``,
    ``T2 = |max_onehot(c1.detach()) − r2|``; per image the mean of the top ``int(C·h·w·topk_ratio)`` entries,
    averaged over the batch; ``L_ecr = L1 + L2``. c1, c2 are the bg-overwritten maps returned by :func:`er_loss`
    (N, C, h2, w2). ``esp_onehot_bug`` (only matters for bg last) replicates max_onehot on channels ``1:``.
    """
    c = c1.shape[1]
    yt = label_with_bg(label, bg_index)[:, :, None, None]
    r1 = resize(max_norm(cam_rv1), cam_rv2.shape[-2:]) * yt
    r2 = max_norm(cam_rv2) * yt
    ch = onehot_channels(c, bg_index, esp_onehot_bug)
    t1 = (max_onehot(c2.detach(), ch) - r1).abs()
    t2 = (max_onehot(c1.detach(), ch) - r2).abs()
    n, _, h, w = t1.shape
    k = max(int(c * h * w * topk_ratio), 1)
    return (torch.topk(t1.reshape(n, -1), k, dim=1).values.mean()
            + torch.topk(t2.reshape(n, -1), k, dim=1).values.mean())


# ----------------------------------------------------------------------------------------------------------------
# pixel-to-prototype contrast (master contrast_train.py, inline; esp module/train.py::get_contrast_loss)


@torch.no_grad()
def pseudo_labels(norm_cam: torch.Tensor, label: torch.Tensor, bg_index: int = 0) -> torch.Tensor:
    """Contrast-loss pseudo labels: ``y[i] = argmax_c(Ĉ_c[i]·ỹ_c)``. norm_cam (N, C, h, w), label (N, K)
    -> (N, h, w) long."""
    yt = label_with_bg(label, bg_index).to(norm_cam.dtype)[:, :, None, None]
    return (norm_cam * yt).argmax(1)


def topk_stable(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with ties broken by position (first entries first): (R, M) -> values, indices
    (R, k). ``torch.topk`` leaves the order of equal values to the kernel (CUDA's is unspecified); a stable
    descending sort fixes it."""
    val, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return val[..., :k], idx[..., :k]


@torch.no_grad()
def prototypes(norm_cam: torch.Tensor, feat: torch.Tensor, k: int, safe_denominator: bool = False,
               eps: float = EPS, stable: bool = False, return_topk: bool = False):
    """Contrast-loss prototypes: one per channel (absent classes included), from the top-k over the **whole batch**.

    Reference (``usr922/wseg@esp`` ``module/train.py::get_contrast_loss``, master ``contrast_train.py`` inline, FSAE's
    ``obeychoi0120/PixMatch`` / ``obeychoi0120/wseg@ssl`` ``module/loss.py::get_contrast_loss``)::

        top_values, top_indices = torch.topk(norm_cam.transpose(0, 1).reshape(C, -1), k)   # over N·h·w
        P[c] = sum(top_values[c, :, None] * f[top_indices[c]], 0) / sum(top_values[c])
        P = F.normalize(P, dim=-1)

    with f the detached, un-normalised features. The denominator is the plain sum of the top-k weights, which
    can be negative or zero (a reference quirk, reproduced by default): a class whose map is zero in every image
    of the batch has Ĉ = −1 everywhere (:func:`contrast_norm_cam`), so P = Σ(−f)/(−k) = +mean of the k selected
    features (a clamp of the sum at ``eps`` would flip that sign); a zero sum (e.g. ``bg_thr`` 0 on the bg
    channel) gives a non-finite prototype, as upstream.

    ``safe_denominator=True`` (config ``classifier.ppc.proto_safe_denominator``; not in the reference) makes
    every prototype a convex combination of its top-k features: weights ``relu(top_values)``, divided by their
    sum; where that sum is ≤ ``eps`` (no positive activation in the batch) the plain mean of the top-k features,
    i.e. the reference's value for a map that is constant (e.g. zero) in every image. It differs from the
    reference only where the top-k mixes signs.

    norm_cam (N, C, h, w), feat (N, D, h, w) -> (C, D). ``k`` is clipped to [1, N·h·w] (upstream's 16×16 view gives
    k = 16 or 32; a tiny test view could give k = 0, an empty sum). Ties (the constant bg channel, an all-zero map)
    are broken by ``torch.topk``, as upstream, or (``stable``) by position, :func:`topk_stable`.
    ``feat`` may be another view's features on the same grid (RTC's cross-view prototypes). ``return_topk``: return
    ``(P, values (C, k), indices (C, k))``.
    """
    n, c, h, w = norm_cam.shape
    d = feat.shape[1]
    cam_flat = norm_cam.detach().permute(1, 0, 2, 3).reshape(c, -1)        # (C, M), rows ordered (n, h, w)
    f_flat = feat.detach().permute(0, 2, 3, 1).reshape(-1, d).to(cam_flat.dtype)  # (M, D)
    k = max(min(int(k), cam_flat.shape[1]), 1)
    val, idx = topk_stable(cam_flat, k) if stable else torch.topk(cam_flat, k, dim=1)   # (C, k)
    if safe_denominator:
        wgt = F.relu(val)
        den = wgt.sum(1, keepdim=True)                                     # (C, 1)
        wgt = torch.where(den > eps, wgt, torch.ones_like(wgt))            # no positive weight: plain mean
        den = torch.where(den > eps, den, torch.full_like(den, float(k)))
        p = F.normalize((wgt[..., None] * f_flat[idx]).sum(1) / den, dim=1)
    else:
        p = F.normalize((val[..., None] * f_flat[idx]).sum(1) / val.sum(1, keepdim=True), dim=1)   # (C, D)
    return (p, val, idx) if return_topk else p


def flat_features(feat: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) -> per-pixel l2-normalised rows (N·h·w, D), ordered (n, h, w)."""
    d = feat.shape[1]
    return F.normalize(feat.permute(0, 2, 3, 1).reshape(-1, d), dim=1)


def proto_ce(f: torch.Tensor, p: torch.Tensor, y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Contrast-loss cross-entropy ``CE(F, P, y) = mean_i −log softmax_c(F_i·P_cᵀ/τ)[y_i]``. 
    f (M, D), p (C, D), y (M,) -> scalar."""
    return F.cross_entropy(f @ p.t().to(f.dtype) / tau, y.reshape(-1))


def hard_proto_loss(f: torch.Tensor, p: torch.Tensor, y: torch.Tensor, tau: float = 0.1, rank_lo: int = 3,
                    rank_hi: int = 13, pos_frac: float = 0.6,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Contrast-loss intra-view term ``H(F, P, y)`` with semi-hard prototype mining and hard pixel sampling.

    Per pixel: ``−log(num/den)``, ``num = exp(F_i·P_{y_i}/τ)``, ``den = num + Σ exp(F_i·P_c/τ)`` over the
    prototypes ranked ``rank_lo+1 .. rank_hi`` (4th..13th) by similarity to F_i (the positive is not excluded).
    Per class c present in y: n pixels; n < 2 -> skipped (still counted in the divisor); else n//2 random pixels
    (without replacement, from ``generator``) + n//2 semi-hard pixels (ascending ``(cos+1)/2`` to P_c, keep the
    lowest int(pos_frac·n), drop the first int(pos_frac·n) − n//2); class loss = mean over both sets.
    ``H = Σ_c class_loss / #present classes``. f (M, D) normalised, p (C, D), y (M,) -> scalar.
    """
    y = y.reshape(-1)
    p = p.to(f.dtype)
    sim = f @ p.t()                                                        # (M, C) cosine
    pos = sim.gather(1, y[:, None]) / tau                                  # (M, 1)
    ranked = sim.sort(1, descending=True).values[:, rank_lo:rank_hi] / tau  # (M, ≤10)
    pix = torch.logsumexp(torch.cat([pos, ranked], 1), 1) - pos[:, 0]      # (M,)
    classes = torch.unique(y)
    total = pix.sum() * 0.0
    for c in classes.tolist():
        sel = (y == c).nonzero(as_tuple=True)[0]
        n = sel.numel()
        if n < 2:
            continue
        half = n // 2
        rnd = sel[torch.randperm(n, generator=generator)[:half].to(sel.device)]
        with torch.no_grad():
            order = torch.argsort((sim[sel, c].detach() + 1) / 2)
        keep = int(pos_frac * n)
        hard = sel[order[:keep][max(keep - half, 0):]]
        total = total + pix[torch.cat([rnd, hard])].mean()
    return total / max(len(classes), 1)


def ppc_contrast_loss(cam1: torch.Tensor, feat1: torch.Tensor, cam2: torch.Tensor, feat2: torch.Tensor,
                      label: torch.Tensor, bg_index: int = 0, bg_thr: float = 0.20, proto_div: int = 8,
                      proto_k: int | None = None, tau: float = 0.1, gamma: float = 0.1,
                      generator: torch.Generator | None = None,
                      proto_safe_denominator: bool = False) -> dict[str, torch.Tensor]:
    """L_nce (esp ``module/train.py::get_contrast_loss``) on the PCM outputs (``cam_rv_down``) and projected features
    (``f_proj``) of both views.

    View 1 (cam1 (N,C,h1,w1), feat1 (N,D,h1,w1)) is resized bilinearly (align_corners) to the view-2 size
    (cam2 (N,C,h,w), feat2 (N,D,h,w)); gradient flows through the feature resize. label (N, K).
    Defaults are master's (bg 0, bg_thr 0.20, k = hw//8, τ = γ = 0.1); esp/FSAE: ``bg_index=-1, bg_thr=0.10,
    proto_div=16``. ``proto_k`` overrides ``(h·w)//proto_div`` (h, w of view 2, per image, not per batch).
    ``proto_safe_denominator``: :func:`prototypes`' ``safe_denominator`` (False: the reference's plain sum).
    Returns ``{"loss", "cross_proto", "cross_label", "intra"}`` (scalars, γ included).
    """
    size = cam2.shape[-2:]
    feat1 = resize(feat1, size)
    with torch.no_grad():
        cam1 = resize(cam1.detach(), size)
        k = proto_k if proto_k is not None else (size[0] * size[1]) // proto_div
        n1 = contrast_norm_cam(cam1, bg_thr, bg_index)
        n2 = contrast_norm_cam(cam2, bg_thr, bg_index)
        y1 = pseudo_labels(n1, label, bg_index).reshape(-1)
        y2 = pseudo_labels(n2, label, bg_index).reshape(-1)
        p1 = prototypes(n1, feat1, k, proto_safe_denominator)
        p2 = prototypes(n2, feat2, k, proto_safe_denominator)
    f1, f2 = flat_features(feat1), flat_features(feat2)
    cross_proto = gamma * 0.5 * (proto_ce(f1, p2, y1, tau) + proto_ce(f2, p1, y2, tau))
    cross_label = gamma * 0.5 * (proto_ce(f1, p1, y2, tau) + proto_ce(f2, p2, y1, tau))
    intra = gamma * 0.5 * (hard_proto_loss(f1, p1, y1, tau, generator=generator)
                           + hard_proto_loss(f2, p2, y2, tau, generator=generator))
    return {"loss": cross_proto + cross_label + intra, "cross_proto": cross_proto, "cross_label": cross_label,
            "intra": intra}


# ----------------------------------------------------------------------------------------------------------------
# EPS saliency loss (esp eps.py::get_eps_loss)


def eps_saliency_loss(cam: torch.Tensor, sal: torch.Tensor, label: torch.Tensor, tau: float = 0.4,
                      alpha: float = 0.5, bg_index: int = -1, eps_per_cell: bool = False) -> torch.Tensor:
    """EPS saliency loss S(cam, sal) (esp ``eps.py::get_eps_loss``, EPS+PPC variant; bg channel **last** by default).

    1. ``sal`` (N, 1, H, W) is resized to the cam size with nearest interpolation;
    2. ``p = softmax(cam)`` over the C channels;
    3. for each present class c: ``iou_c = Σ round(p_c)·round(sal) / (Σ round(p_c) + 1e-4)``, valid iff > ``tau``;
    4. ``fg = Σ_{present & valid} p_c``, ``bg = 1 − (p_bg + Σ_{present & invalid} p_c)``; absent classes ignored;
    5. ``MSE(alpha·fg + (1−alpha)·bg, sal)``.
    cam (N, C, h, w), label (N, K). Scalar. ``eps_per_cell``: the 1e-4 is added to every cell before the sum
    (SP-CAM, CHENDL-SHEN/ESC ``core/loss.py::SP_CAM_Loss``, bg channel first: ``bg_index=0``).
    """
    n, c, h, w = cam.shape
    sal = F.interpolate(sal.to(cam.dtype), size=(h, w), mode="nearest")
    p = F.softmax(cam, 1)
    b = _bg(bg_index, c)
    fg_idx = _fg_index(b, c, cam.device)
    pf = p[:, fg_idx]                                                      # (N, K, h, w)
    with torch.no_grad():
        r = torch.round(pf)
        iou = (r * torch.round(sal)).sum((2, 3)) / (r.sum((2, 3)) + 1e-4 * (h * w if eps_per_cell else 1))  # (N, K)
        present = label > 0.5
        valid = (present & (iou > tau)).to(p.dtype)[:, :, None, None]
        invalid = (present & ~(iou > tau)).to(p.dtype)[:, :, None, None]
    fg = (pf * valid).sum(1, keepdim=True)
    bg = 1 - (p[:, b:b + 1] + (pf * invalid).sum(1, keepdim=True))
    return F.mse_loss(alpha * fg + (1 - alpha) * bg, sal)


# ----------------------------------------------------------------------------------------------------------------
# optimizer (PolyOptimizer: master tool/torchutils.py, esp util/torchutils.py)


def ppc_param_groups(model: nn.Module, new_layers: Iterable[nn.Module], lr: float,
                     weight_decay: float = OPTIM_DEFAULTS["weight_decay"]) -> list[dict[str, Any]]:
    """The four ``PolyOptimizer`` groups (``network/resnet38_contrast.py::Net.get_parameter_groups``), from
    Conv2d/GroupNorm weights and biases with ``requires_grad`` only.

    | backbone weights lr, wd | backbone biases 2·lr, 0 | new weights 10·lr, wd | new biases 20·lr, 0 |

    Modules inside ``new_layers`` (e.g. fc8, fc_proj, f8_3, f8_4, f9) are "new"; every other Conv2d/GroupNorm of
    ``model`` is backbone. Empty groups are dropped. The SGD over them (momentum = weight decay, the quirk, unless
    ``fix_quirk``) is :func:`wsss_core.engine.optim.reference_sgd`.
    """
    new_ids = {id(p) for m in new_layers for p in m.parameters()}
    groups: dict[str, list] = {"bw": [], "bb": [], "nw": [], "nb": []}
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.GroupNorm)):
            continue
        for name, prm in (("w", m.weight), ("b", m.bias)):
            if prm is None or not prm.requires_grad or id(prm) in seen:
                continue
            seen.add(id(prm))
            groups[("n" if id(prm) in new_ids else "b") + name].append(prm)
    spec = {"bw": (1, weight_decay), "bb": (2, 0.0), "nw": (10, weight_decay), "nb": (20, 0.0)}
    return [{"params": groups[g], "lr": lr * mult, "weight_decay": wd, "name": g}
            for g, (mult, wd) in spec.items() if groups[g]]
