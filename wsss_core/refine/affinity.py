"""AffinityNet (PSA, Ahn & Kwak, CVPR 2018; ``jiwoon-ahn/psa``) and random-walk refinement, as used by SEAM-PPC
(``usr922/wseg`` master ``aff_prepare.py`` / ``aff_train.py`` / ``aff_infer.py``) and MCTformer (``xulianuwa/MCTformer``
``psa/train_aff.py``, ``psa/infer_aff.py``, ``psa/voc12/data.py``, ``psa/network/resnet38_aff.py``).

Pieces (pure torch / numpy; devices follow the inputs):

- :func:`pair_offsets` / :func:`pair_indices`: the radius-r "forward" neighbour pairs (34 offsets at r = 5);
  :func:`walk_radius`: wseg's smaller radius on a small feature grid;
- :func:`affinity_label_map`: confident fg from the low-alpha CRF, confident bg from the high-alpha CRF, everything else
  ignored (255); :func:`score_label_map` the same from the two CRF score stacks (MCTformer
  ``psa/voc12/data.py::VOC12AffDataset.__getitem__``), :func:`block_mean` their 8x8 reduction to stride 8 (same place);
  :func:`pair_labels`: bg-pos / fg-pos / neg pair masks;
- :class:`AffinityNet`: ResNet-38 + ELU branches (conv4, conv5, conv6) -> 448-d features;
  :func:`pair_affinities` ``a_ij = exp(-mean_c |f_i - f_j|)``; :func:`affinity_loss` ``bg/4 + fg/4 + neg/2``;
- :func:`dense_affinity`, :func:`transition_matrix` (``A^beta``, column-normalised, squared ``logt`` times)
  and :func:`random_walk` (``cam . T``).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.io import IGNORE_INDEX
from ..models.resnet38 import build_resnet38

EPS = 1e-5


def pair_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """(dy, dx) offsets: (0, 1..r-1), then for dy = 1..r-1 every dx in -(r-1)..r-1 with dx² + dy² < r²."""
    out = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                out.append((dy, dx))
    return out


def pair_indices(h: int, w: int, radius: int = 5,
                 offsets: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the pairs on an h x w grid: ``from`` (n_from,) and ``to`` (n_offsets, n_from).

    ``offsets`` (default :func:`pair_offsets`) sets the direction order (IRN orders them by path length).
    "From" pixels are rows 0..h-r and columns r-1..w-r (so every offset stays inside the grid); a grid smaller
    than that (h < r or w < 2r - 1), or a radius < 2 (no offsets), has no pairs, and the random walk leaves its
    scores unchanged.
    The tables are computed once per (h, w, radius, offsets) and shared (callers must not modify them).
    """
    return _pair_indices(int(h), int(w), int(radius), None if offsets is None else tuple(map(tuple, offsets)))


@functools.lru_cache(maxsize=64)
def _pair_indices(h: int, w: int, radius: int,
                  offsets: tuple[tuple[int, int], ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    r = radius
    offsets = pair_offsets(radius) if offsets is None else offsets
    if not offsets:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(0, max(h - r + 1, 0)), torch.arange(r - 1, max(w - r + 1, r - 1)),
                            indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    frm = ys * w + xs
    to = torch.stack([(ys + dy) * w + (xs + dx) for dy, dx in offsets])
    return frm, to


def walk_radius(h: int, w: int, radius: int = 5, shrink: bool = True) -> int:
    """The pair radius of the random walk on an h x w feature grid.

    usr922/wseg ``network/resnet38_aff.py::Net.forward``: a grid whose short side m is below ``2 * radius + 1``
    uses radius ``(m - 1) // 2`` (so radius 5 becomes 4 for m = 9, 10 and 3 for m = 7, 8); ``shrink=False`` keeps
    ``radius`` (jiwoon-ahn/psa ``network/resnet38_aff.py::Net.forward`` and its copy in xulianuwa/MCTformer
    ``psa/network/resnet38_aff.py``, where a grid
    too small for the radius, h < r or w < 2r - 1, gives empty or mismatched pair indices and the forward fails;
    here it has no pairs, see :func:`pair_indices`)."""
    m = min(int(h), int(w))
    if shrink and m < 2 * radius + 1:
        return max((m - 1) // 2, 0)
    return int(radius)


def affinity_label_map(la: np.ndarray, ha: np.ndarray) -> np.ndarray:
    """Label map for affinity training from the low-alpha and high-alpha CRF label maps (compact labels,
    0 = bg): fg where ``la`` says a class (unless ``ha`` says bg), bg where ``ha`` says bg, else 255."""
    out = la.astype(np.uint8).copy()
    out[la == 0] = IGNORE_INDEX
    out[ha == 0] = 0
    return out


def score_label_map(s_la: np.ndarray, s_ha: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """MCTformer ``psa/voc12/data.py::VOC12AffDataset.__getitem__``: the low- and high-alpha CRF scores over [bg, cams],
    each float (K+1, h, w), -> uint8 (h, w) labels: per stack argmax mapped to ``[0, *keys]``, fused by
    :func:`affinity_label_map`, and 255 where the max over both stacks is < 1e-5 ("no score": zero crop padding)."""
    if s_la.shape != s_ha.shape or s_la.ndim != 3 or s_la.shape[0] != len(keys) + 1:
        raise ValueError(f"need two (K+1, h, w) score stacks for K = {len(keys)}, got {s_la.shape}, {s_ha.shape}")
    lut = np.concatenate([[0], np.asarray(keys, np.int64)])
    out = affinity_label_map(lut[s_la.argmax(0)], lut[s_ha.argmax(0)])
    out[np.maximum(s_la.max(0), s_ha.max(0)) < EPS] = IGNORE_INDEX
    return out


def block_mean(x: np.ndarray, block: int = 8) -> np.ndarray:
    """(C, H, W) -> (C, H/block, W/block) means over non-overlapping block x block tiles (skimage ``block_reduce``
    with ``np.mean``); H and W must be multiples of ``block``."""
    c, h, w = x.shape
    if h % block or w % block:
        raise ValueError(f"block_mean needs H, W multiples of {block}, got {h} x {w}")
    return x.reshape(c, h // block, block, w // block, block).mean(axis=(2, 4))


def pair_labels(labels: torch.Tensor, radius: int = 5, offsets: list[tuple[int, int]] | None = None,
                ignore_at_least: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, h, w) int labels -> ``bg_pos``, ``fg_pos``, ``neg`` float masks (B, n_offsets, n_from).

    Labels >= ``ignore_at_least`` are ignored (255 here; IRN treats every value >= C as invalid)."""
    b, h, w = labels.shape
    frm, to = pair_indices(h, w, radius, offsets)
    flat = labels.reshape(b, -1)
    lf = flat[:, frm.to(flat.device)][:, None, :]
    lt = flat[:, to.to(flat.device)]
    valid = (lf < ignore_at_least) & (lt < ignore_at_least)
    bg_pos = (lf == 0) & (lt == 0)
    fg_pos = (lf == lt) & (lf != 0) & valid
    neg = (lf != lt) & valid
    return bg_pos.float(), fg_pos.float(), neg.float()


class AffinityNet(nn.Module):
    """ResNet-38 trunk + affinity head. forward: (B, 3, H, W) -> features (B, 448, H/8, W/8).

    Head: ELU(f8_3(conv4) -> 64), ELU(f8_4(conv5) -> 128), ELU(f8_5(conv6) -> 256), concatenated (448),
    ELU(f9 448 -> 448). All 1x1, bias-free; Kaiming init, f9 Xavier gain 4 (``psa/network/resnet38_aff.py::Net``).
    Scaled with the backbone width for narrow toy networks.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        t = backbone.tap_channels
        self.f8_3 = nn.Conv2d(t["conv4"], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(t["conv5"], 128, 1, bias=False)
        self.f8_5 = nn.Conv2d(backbone.out_channels, 256, 1, bias=False)
        self.f9 = nn.Conv2d(448, 448, 1, bias=False)
        for conv in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    @property
    def new_layers(self) -> list[nn.Module]:
        return [self.f8_3, self.f8_4, self.f8_5, self.f9]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        cat = torch.cat([F.elu(self.f8_3(f["conv4"])), F.elu(self.f8_4(f["conv5"])), F.elu(self.f8_5(f["conv6"]))], 1)
        return F.elu(self.f9(cat))


def build_affinity_net(cfg: Mapping[str, Any], cache_dir: str = "weights") -> AffinityNet:
    bb = cfg["backbone"]
    return AffinityNet(build_resnet38(weights=bb.get("weights"), cache_dir=cache_dir,
                                      frozen_bn=bb.get("frozen_bn", True), frozen_stem=bb.get("frozen_stem", True),
                                      width=bb.get("width", 1.0)))


def pair_affinities(feat: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """(B, D, h, w) -> a_ij = exp(-mean_c |f_i - f_j|) for the radius pairs, (B, n_offsets, n_from) in (0, 1]."""
    b, d, h, w = feat.shape
    frm, to = pair_indices(h, w, radius)
    flat = feat.reshape(b, d, -1)
    ff = flat[:, :, frm.to(feat.device)][:, :, None, :]
    ft = flat[:, :, to.to(feat.device)]
    return torch.exp(-(ff - ft).abs().mean(1))


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor) -> dict:
    """``psa/train_aff.py``: ``L = bg/4 + fg/4 + neg/2`` with counts summed over the batch (eps 1e-5)."""
    bg = -(bg_pos * torch.log(aff + EPS)).sum() / (bg_pos.sum() + EPS)
    fg = -(fg_pos * torch.log(aff + EPS)).sum() / (fg_pos.sum() + EPS)
    ng = -(neg * torch.log(1 + EPS - aff)).sum() / (neg.sum() + EPS)
    return {"loss": bg / 4 + fg / 4 + ng / 2, "loss_bg": bg, "loss_fg": fg, "loss_neg": ng}


def dense_affinity(aff: torch.Tensor, h: int, w: int, radius: int = 5) -> torch.Tensor:
    """(n_offsets, n_from) pair affinities of one image -> symmetric (hw, hw) matrix with 1 on the diagonal."""
    frm, to = pair_indices(h, w, radius)
    n = h * w
    a = torch.zeros(n, n, dtype=aff.dtype, device=aff.device)
    rows = frm[None].expand_as(to).reshape(-1).to(aff.device)
    cols = to.reshape(-1).to(aff.device)
    a[rows, cols] = aff.reshape(-1)
    a[cols, rows] = aff.reshape(-1)
    a.fill_diagonal_(1.0)
    return a


def transition_matrix(a: torch.Tensor, beta: float = 8.0, logt: int = 6) -> torch.Tensor:
    """(n, n) symmetric affinities -> ``T = (A^beta / column sums)^(2^logt)`` (n, n): every column sums to 1.

    Orientation: :func:`random_walk` computes ``V . T``, so destination pixel j receives ``sum_i V[:, i] T[i, j]``;
    its weights over the sources i are column j, i.e. ``T.t()`` is row-stochastic (a proper averaging operator).
    """
    t = a.pow(beta)
    t = t / t.sum(0, keepdim=True)
    for _ in range(int(logt)):
        t = t @ t
    return t


def random_walk(cams: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(C, h, w) scores (bg included) and (hw, hw) ``T`` -> propagated scores ``cam . T`` (C, h, w)."""
    c, h, w = cams.shape
    return (cams.reshape(c, -1) @ trans).reshape(c, h, w)
