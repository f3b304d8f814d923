"""MSA's affinity operators and loss (multi-type semantic affinity; CHENDL-SHEN/MSA at 0550782).

- :func:`make_cam` (``tools/ai/torch_utils.py::make_cam``, shared with SP-CAM / PuzzleCAM);
- :func:`affinity_propagation` (AP, ``core/networks.py::SP_CAM_Model3.forward``, the ``pcm`` loop): a feature-cosine
  affinity, thresholded and column-normalised, applied ``beta`` times to the CAM logits;
- :func:`tile_features` / :func:`merge_features` (``tools/general/Q_util.py``): patches of a map as batch items;
- :func:`ipc_loss` (intra-patch prototype contrast, ``core/loss.py::SP_CAM_Loss2``): superpixel targets reconstructed
  from class prototypes weighted by the CAMs.

The DCR (target-normalised 3x3 gather) is :func:`wsss_core.superpixel.ops.dcr`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_cam(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel max-normalised CAM: ``relu(relu(x) - eps) / (max_spatial(relu(x)) + eps)``.

    x: (B, C, H, W) -> (B, C, H, W) in [0, 1). CHENDL-SHEN/ESC ``tools/ai/torch_utils.py::make_cam``.
    """
    x = F.relu(x)
    mx = x.flatten(2).amax(-1)[..., None, None]
    return F.relu(x - eps) / (mx + eps)


def affinity_propagation(z: torch.Tensor, feats: torch.Tensor, beta: int = 8, gamma: float = 0.6) -> torch.Tensor:
    """AP: ``beta`` steps ``z(j) <- sum_i z(i) W_ij`` with ``W = S / colsum(S)``, ``S = clamp(f_i . f_j, 0.01, 0.999)``
    set to 0 below ``gamma``, f the L2-normalised ``feats``.

    z: (B, C, h, w), feats: (B, D, h, w) -> (B, C, h, w). O((hw)^2) memory per image. beta = 0 returns z.
    """
    if beta <= 0:
        return z
    b, c, h, w = z.shape
    f = F.normalize(feats.flatten(2), dim=1)                                  # (B, D, N)
    s = torch.bmm(f.transpose(1, 2), f).clamp(0.01, 0.999)                    # (B, N, N)
    s = torch.where(s < gamma, torch.zeros_like(s), s)
    wmat = s / s.sum(1, keepdim=True)                                         # columns sum to 1
    flat = z.flatten(2)
    for _ in range(beta):
        flat = torch.bmm(flat, wmat)
    return flat.view(b, c, h, w)


def tile_features(x: torch.Tensor, n_pieces: int) -> torch.Tensor:
    """Split (B, C, h, w) into a sqrt(n) x sqrt(n) grid of equal patches (remainder rows/columns dropped), row-major,
    stacked on the batch axis: (n B, C, h // r, w // r), patch-major (all images of patch 0 first)."""
    r = math.isqrt(n_pieces)
    if r * r != n_pieces:
        raise ValueError(f"the number of patches must be a square, not {n_pieces}")
    ph, pw = x.shape[-2] // r, x.shape[-1] // r
    if ph == 0 or pw == 0:
        raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} map cannot be split into {r}x{r} patches")
    return torch.cat([x[..., i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] for i in range(r) for j in range(r)], 0)


def merge_features(x: torch.Tensor, n_pieces: int, batch_size: int) -> torch.Tensor:
    """Inverse of :func:`tile_features` (on the part it kept): (n B, C, ph, pw) -> (B, C, r ph, r pw)."""
    r = math.isqrt(n_pieces)
    parts = list(torch.split(x, batch_size))
    return torch.cat([torch.cat(parts[i * r:(i + 1) * r], 3) for i in range(r)], 2)


def ipc_loss(fg_cam: torch.Tensor, target: torch.Tensor, ig_th: float, valid_over_image_only: bool = False
             ) -> torch.Tensor:
    """Intra-patch prototype contrast (``SP_CAM_Loss2.forward``), on patches already stacked on the batch axis.

    fg_cam: (B, C, h, w) foreground CAMs in [0, 1] (``make_cam(z[:, 1:]) * tags``); target: (B, T, h, w) superpixel
    targets (detached; cells outside the image are 0 in every channel). ``Bg = 1 - max_c fg``, ``P = [Bg, fg]``. A
    patch is used when it has both fg and bg: ``max(1 - Bg m) > ig_th`` and ``max(Bg m) > ig_th`` (all patches
    if none qualifies), m = target cells not all 0. Prototypes ``proto_c = sum P_c T^ / (sum P_c + 1e-5)`` of the
    L2-normalised target, reconstruction ``R = sum_c P_c proto_c``, loss = masked squared error summed over channels,
    averaged over the used cells (+1e-3). Reference quirk: padding cells (m = 0) make ``1 - Bg m = 1`` pass the
    first test; ``valid_over_image_only`` takes both maxima over m = 1 cells only.
    """
    b = fg_cam.shape[0]
    m = (target.sum(1, keepdim=True) != 0).to(fg_cam.dtype)
    bg = 1 - fg_cam.max(1, keepdim=True).values
    with torch.no_grad():
        bgd = bg.detach()
        if valid_over_image_only:
            has_fg = ((1 - bgd) * m).flatten(1).amax(1) > ig_th
        else:
            has_fg = (1 - bgd * m).flatten(1).amax(1) > ig_th
        has_bg = (bgd * m).flatten(1).amax(1) > ig_th
        used = has_fg & has_bg
        if not used.any():
            used = torch.ones_like(used)
    mu = m * used.to(m.dtype).view(b, 1, 1, 1)
    p = torch.cat([bg, fg_cam], 1) * mu                                      # (B, C+1, h, w)
    t = F.normalize(target.detach(), dim=1) * mu                             # (B, T, h, w)
    pf, tf = p.flatten(2), t.flatten(2)                                      # (B, K, N), (B, T, N)
    proto = torch.bmm(tf, pf.transpose(1, 2)) / (pf.sum(2)[:, None] + 1e-5)  # (B, T, K)
    rec = torch.bmm(proto, pf)                                               # (B, T, N)
    err = ((rec - tf) ** 2) * mu.flatten(2)
    return err.sum() / (mu.sum() + 1e-3)
