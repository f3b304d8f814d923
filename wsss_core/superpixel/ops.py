"""Grid superpixels: the 3x3 association map Q and the operators built on it.

A superpixel network (SpixelFCN, Yang et al., CVPR 2020, github.com/fuy34/superpixel_fcn) predicts for every pixel p a
distribution over the 9 grid cells around its own cell ``c(p) = (y // S, x // S)``:

    Q: (B, 9, H, W), Q >= 0, sum_k Q_k = 1, channel k = offset d_k = (k // 3 - 1, k % 3 - 1)  (4: own cell).

Mass sent outside the grid is lost (not renormalised). Superpixel s is grid cell s; a map on the superpixels is a
(B, C, h, w) tensor with h = H / S, w = W / S.

Operators (SP-CAM, CHENDL-SHEN/ESC ``tools/general/Q_util.py``; the same file in CHENDL-SHEN/MSA):

- :func:`pool` (``poolfeat``): pixel map -> superpixel map, ``F(s) = sum_p Q(p->s) f(p) / sum_p Q(p->s)``;
- :func:`up` (``upfeat``): superpixel map -> pixel map, ``f(p) = sum_k Q_k(p) F(c(p) + d_k)``; with ``cell=1`` and
  any 9-channel weight map it is the 3x3 dynamic local filter of MSA's DCR (:func:`dcr`);
- :func:`drm`: SP-CAM's source-normalised scatter (``core/networks.py::get_noliner`` then ``upfeat(.., 1, 1)``);
- :func:`asam` (``calc_affmat``): the adjacent superpixel affinity ``A(s, s + e_j)`` over 25 offsets
  ``e_j = (j // 5 - 2, j % 5 - 2)``; :func:`random_walk` (``refine_with_affmat``) and :func:`refine_with_q`.

Every function takes its device and dtype from its inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CELL = 16                                                      # superpixel grid cell (pixels)
OFFSETS9 = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))    # d_k, row-major TL, T, TR, L, C, R, BL, B, BR
OFFSETS25 = tuple((j // 5 - 2, j % 5 - 2) for j in range(25))  # e_j; j = (dy + 2) * 5 + (dx + 2)
CENTER9 = 4
CENTER25 = 12
POOL_EPS = 1e-8                                                # in avg-pool units, as ``poolfeat``


def grid_size(q: torch.Tensor, cell: int = CELL) -> tuple[int, int]:
    """(h, w) of the superpixel grid of ``q`` (B, 9, H, W); H and W must be multiples of ``cell``."""
    if q.dim() != 4 or q.shape[1] != 9:
        raise ValueError(f"Q must be (B, 9, H, W), got {tuple(q.shape)}")
    hh, ww = q.shape[-2:]
    if hh % cell or ww % cell:
        raise ValueError(f"Q of size {hh}x{ww}: height and width must be multiples of the cell size {cell} "
                         f"(resize the image to the next multiple of {cell} first)")
    return hh // cell, ww // cell


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = x[..., y - dy, x - dx]`` with zeros where that falls outside (content moves by (dy, dx)).

    x: (..., h, w) -> same shape.
    """
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def pool(f: torch.Tensor, q: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Pixel-to-superpixel pooling: ``F(s) = sum_p Q(p->s) f(p) / (sum_p Q(p->s) + eps)``.

    f: (B, C, H, W), q: (B, 9, H, W) -> (B, C, h, w). As ``poolfeat``: sums are average-pooled per cell (the 1/S^2
    cancels) and eps = 1e-8 is added to the pooled mass.
    """
    grid_size(q, cell)
    f1 = torch.cat([f, torch.ones_like(f[:, :1])], 1)
    acc = None
    for k, (dy, dx) in enumerate(OFFSETS9):
        part = shift(F.avg_pool2d(f1 * q[:, k:k + 1], cell, cell), dy, dx)   # cell c sends to c + d_k
        acc = part if acc is None else acc + part
    return acc[:, :-1] / (acc[:, -1:] + POOL_EPS)


def pool_mass(q: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Superpixel mass ``m(s) = sum_p Q(p->s)`` in average-pool units (sum / S^2). q: (B, 9, H, W) -> (B, 1, h, w)."""
    grid_size(q, cell)
    acc = None
    for k, (dy, dx) in enumerate(OFFSETS9):
        part = shift(F.avg_pool2d(q[:, k:k + 1], cell, cell), dy, dx)
        acc = part if acc is None else acc + part
    return acc


def up(x: torch.Tensor, w: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Superpixel-to-pixel upsampling (3x3 gather): ``out(p) = sum_k w_k(p) x(c(p) + d_k)``, x = 0 outside the grid.

    x: (B, C, h, w), w: (B, 9, h * cell, w * cell) -> (B, C, h * cell, w * cell). ``cell=1``: a 3x3 dynamic local
    filter with per-pixel weights (MSA's DCR).
    """
    b, c, h, wd = x.shape
    if w.shape[1] != 9 or tuple(w.shape[-2:]) != (h * cell, wd * cell):
        raise ValueError(f"weights {tuple(w.shape)} do not fit a {h}x{wd} map at cell size {cell}")
    out = None
    for k, (dy, dx) in enumerate(OFFSETS9):
        src = shift(x, -dy, -dx)                                   # src(c) = x(c + d_k)
        if cell > 1:
            src = src.repeat_interleave(cell, -2).repeat_interleave(cell, -1)
        part = src * w[:, k:k + 1]
        out = part if out is None else out + part
    return out


def dcr(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Dynamic convolutional reconstruction (MSA): target-normalised 3x3 gather ``out(p) = sum_k w_k(p) x(p + d_k)``.

    x: (B, C, h, w), w: (B, 9, h, w) with sum_k w_k = 1 -> (B, C, h, w). CHENDL-SHEN/MSA ``core/networks.py::
    SP_CAM_Model3.forward`` (``upfeat(x, w, 1, 1)``).
    """
    return up(x, w, cell=1)


def drm(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Deconvolution reconstruction (SP-CAM): source-normalised 3x3 scatter ``out(p) = sum_k w_k(p + d_k) z(p + d_k)``.

    Source cell q sends ``w_k(q) z(q)`` to ``q - d_k``; with sum_k w_k = 1 the total is conserved up to what
    leaves the grid. z: (B, C, h, w), w: (B, 9, h, w) -> (B, C, h, w). CHENDL-SHEN/ESC ``core/networks.py::
    SP_CAM_Model.DRM`` / ``get_noliner``.
    """
    out = None
    for k, (dy, dx) in enumerate(OFFSETS9):
        part = shift(w[:, k:k + 1] * z, -dy, -dx)
        out = part if out is None else out + part
    return out


def asam(q: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Adjacent superpixel affinity ``A_j(s) = sum_p Q(p->s) Q(p->s+e_j) / sum_p Q(p->s)``.

    q: (B, 9, H, W) -> (B, 25, h, w), channel j = offset e_j (12: self). Row-stochastic where Q loses no mass;
    detailed balance ``m(s) A(s, t) = m(t) A(t, s)``. Equal to ``calc_affmat`` (pool of up of a tiled one-hot id map,
    gathered), computed as the 81 pairs (k, l) of candidate cells of each pixel: the pair sends
    avg-pool(Q_k Q_l) at cell c to s = c + d_k, offset e = d_l - d_k.
    """
    h, w = grid_size(q, cell)
    b = q.shape[0]
    num = q.new_zeros(b, 25, h, w)
    for k, (dy, dx) in enumerate(OFFSETS9):
        pooled = F.avg_pool2d(q[:, k:k + 1] * q, cell, cell)           # (B, 9, h, w): pairs (k, l) at cell c
        moved = shift(pooled, dy, dx)                                  # to s = c + d_k
        for l_, (ly, lx) in enumerate(OFFSETS9):
            j = (ly - dy + 2) * 5 + (lx - dx + 2)
            num[:, j] += moved[:, l_]
    return num * _inside25(h, w, q) / (pool_mass(q, cell) + POOL_EPS)


def _inside25(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(25, h, w) mask: 1 where s + e_j is a grid cell (the lost mass of Q has no superpixel to pair with)."""
    ys = torch.arange(h, device=like.device)[:, None]
    xs = torch.arange(w, device=like.device)[None, :]
    return torch.stack([((ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w))
                        for dy, dx in OFFSETS25]).to(like.dtype)


def random_walk(x: torch.Tensor, a: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``steps`` superpixel random-walk steps ``x'(s) = sum_j A_j(s) x(s + e_j)`` (x = 0 outside the grid).

    x: (B, C, h, w), a: (B, 25, h, w) from :func:`asam` -> (B, C, h, w). ``refine_with_affmat``.
    """
    if tuple(a.shape[-2:]) != tuple(x.shape[-2:]) or a.shape[1] != 25:
        raise ValueError(f"affinity {tuple(a.shape)} does not fit a map of shape {tuple(x.shape)}")
    for _ in range(steps):
        out = None
        for j, (dy, dx) in enumerate(OFFSETS25):
            part = a[:, j:j + 1] * shift(x, -dy, -dx)
            out = part if out is None else out + part
        x = out
    return x


def refine_with_q(x: torch.Tensor, q: torch.Tensor, n: int, a: torch.Tensor | None = None,
                  cell: int = CELL) -> torch.Tensor:
    """``refine_with_q``: a pixel map is pooled, walked ``n - 1`` steps and upsampled; a grid map is walked ``n`` steps.

    x: (B, C, H, W) or (B, C, h, w); q: (B, 9, H, W) -> x's shape. n = 0 returns x unchanged. ``a``: a precomputed
    :func:`asam` of ``q``.
    """
    if n <= 0:
        return x
    a = asam(q, cell) if a is None else a
    if x.shape[-2:] == q.shape[-2:]:
        return up(random_walk(pool(x, q, cell), a, n - 1), q, cell)
    return random_walk(x, a, n)


def hard_labels(q: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Hard superpixel id per pixel (visualisation): the cell ``c(p) + d_argmax``, clamped to the grid, as
    ``sy * w + sx``.

    q: (B, 9, H, W) -> (B, H, W) int64.
    """
    h, w = grid_size(q, cell)
    k = q.argmax(1)
    ys = torch.arange(q.shape[-2], device=q.device)[:, None] // cell
    xs = torch.arange(q.shape[-1], device=q.device)[None, :] // cell
    sy = (ys + k // 3 - 1).clamp(0, h - 1)
    sx = (xs + k % 3 - 1).clamp(0, w - 1)
    return sy * w + sx


def center_q(b: int, hh: int, ww: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The Q of plain grid cells (all mass on the own cell): (B, 9, H, W)."""
    q = torch.zeros(b, 9, hh, ww, device=device, dtype=dtype)
    q[:, CENTER9] = 1
    return q
