"""SIPE (Chen et al., CVPR 2022) op core, groundwork for its method module. Upstream: ``chenqi1126/SIPE``
``network/resnet50_SIPE.py`` (class ``Net``) and ``train_resnet50_SIPE.py::train``.

Shapes: N batch, C classes incl. background (channel 0), h x w the OS16 map, D feature channels.
Everything is pure torch on the inputs' device/dtype.

- :func:`norm_cam` (``Net.forward``, norm_cam): ReLU'd CAM logits max-normalised per channel, bg = 1 - max fg,
  optional mask;
- :func:`seed_iou` / :func:`structure_seeds` (``Net.get_seed``): soft IoU between each pixel's (ReLU'd cosine)
  correlation row and each class map, bg x 0.5, one-hot argmax, then masked;
- :func:`prototypes` (``Net.get_prototype``): per-image, per-class seed-masked feature sums / (h·w);
- :func:`is_cam` (``Net.reactivate``): ReLU(cos(feature, prototype));
- :func:`gsc_loss` (lossGSC of ``train_resnet50_SIPE.py::train``): mean |norm_cam - IS_cam / (max + 1e-5)|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5
BG_SEED_SCALE = 0.5  # SIPE Net.get_seed: miou[:, 0] * 0.5


def norm_cam(cam: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """SIPE ``Net.forward`` norm_cam: (N, C-1, h, w) fg CAM logits -> (N, C, h, w) [bg, fg] in [0, 1].

    ``relu(cam) / (max_hw + eps)`` per channel; bg = 1 - max over *all* fg channels (before masking); then
    multiplied by ``mask`` ((N, C, h, w) or broadcastable: training's valid_mask_lowres) if given.
    """
    x = max_normalise(F.relu(cam), eps)
    out = torch.cat([1 - x.amax(1, keepdim=True), x], 1)
    return out * mask if mask is not None else out


def max_normalise(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(..., C, h, w) -> each channel divided by its spatial max + eps."""
    return x / (x.flatten(-2).amax(-1)[..., None, None] + eps)


def l2_normalise(feat: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(N, D, ...) -> per-pixel l2-normalised over D (norm + eps)."""
    return feat / (feat.norm(dim=1, keepdim=True) + eps)


def correlation(feat: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(N, D, h, w) -> ``relu(F^T F)`` (N, hw, hw) of per-pixel l2-normalised features: cosine similarity with negatives
    clipped (SIPE ``Net.get_seed``; SFC's PCM affinity, ``Barrett-python/SFC network/resnet50_SFC.py::Net.PCM``, before
    its column normalisation)."""
    n, d = feat.shape[:2]
    f = l2_normalise(feat, eps).reshape(n, d, -1)
    return F.relu(torch.bmm(f.transpose(1, 2), f))


def argmax_seeds(scores: torch.Tensor, mask: torch.Tensor, bg_scale: float = 1.0) -> torch.Tensor:
    """One-hot argmax over C of ``scores`` (N, C, h, w), the bg channel first multiplied by ``bg_scale``, times
    ``mask`` (broadcastable): the argmax is taken before masking, so a pixel whose best class is absent gets no
    seed. ``scores`` is not modified."""
    c = scores.shape[1]
    scale = torch.ones(c, device=scores.device, dtype=scores.dtype)
    scale[0] = bg_scale
    best = (scores.detach() * scale.view(1, -1, 1, 1)).argmax(1)
    return F.one_hot(best, c).permute(0, 3, 1, 2).to(scores.dtype) * mask


def seed_iou(cams: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """SIPE ``Net.get_seed``: soft IoU (N, C, h, w) of each pixel's correlation row with each class map (bg x 0.5).

    cams (N, C, h, w), feat (N, D, h, w). ``S = relu(F^T F)`` of per-pixel l2-normalised features;
    ``inter_c(i) = sum_j S(i, j) M_c(j)`` computed as a matmul (S is symmetric), ``union = sum_j S(i, j) +
    sum_j M_c(j) - inter``; no epsilon, as in the reference.
    """
    n, c, h, w = cams.shape
    s = correlation(feat)                                                # (N, hw, hw)
    m = cams.reshape(n, c, h * w)
    inter = torch.bmm(m, s)                                              # (N, C, hw): S symmetric
    union = s.sum(1)[:, None, :] + m.sum(-1, keepdim=True) - inter
    iou = (inter / union).reshape(n, c, h, w)
    scale = torch.ones(c, device=iou.device, dtype=iou.dtype)
    scale[0] = BG_SEED_SCALE
    return iou * scale.view(1, c, 1, 1)


def structure_seeds(cams: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SIPE ``Net.get_seed``: one-hot argmax of :func:`seed_iou` (N, C, h, w), times ``mask`` (argmax taken before
    masking, so a pixel whose best class is absent gets no seed)."""
    return argmax_seeds(seed_iou(cams, feat), mask)


def prototypes(seeds: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """SIPE ``Net.get_prototype``: (N, C, h, w) seeds, (N, D, h, w) features -> (N, C, D)
    ``sum_j seed_c(j) f(j) / (h w)``."""
    n, c, h, w = seeds.shape
    return torch.einsum("nchw,ndhw->ncd", seeds, feat) / (h * w)


def is_cam(feat: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """SIPE ``Net.reactivate``: ReLU(cosine(f(i), p_c)) (N, C, h, w) with torch's cosine eps 1e-8
    (zero prototype -> 0)."""
    return F.relu(F.cosine_similarity(feat[:, None], protos[:, :, :, None, None], dim=2, eps=1e-8))


def gsc_loss(ncam: torch.Tensor, iscam: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """lossGSC of SIPE ``train_resnet50_SIPE.py::train``: mean over (N, C, h, w) of
    ``|norm_cam - IS_cam / (max_hw IS_cam + eps)|``; both sides get gradients."""
    return (ncam - max_normalise(iscam, eps)).abs().mean()
