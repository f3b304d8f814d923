"""Pixel-adaptive refinement of masks by image-driven local affinities: VARM (RTC), PAR (AFA) and PAMR (1-stage).

The three operators share one structure. A neighbourhood of P = 8·|D| pixels (the 8 outer taps of a 3x3 stencil at
each dilation d in D, the borders replicated) gets per-pixel weights K (B, P, H, W) computed once from the image;
the mask is then propagated ``n_iter`` times as

    m(x) <- sum_p K_p(x) · m(x + o_p)        (o_p the p-th neighbour offset, indices clamped to the map).

Upstream (cited per function below): ``ChunyanWang1/RTC`` ``network/VARM.py::VARM``, ``network/PAR.py::PAR`` and
``network/pamr.py::PAMR`` (PAMR after Araslanov & Roth, CVPR 2020; PAR after Ru et al., CVPR 2022). The upstream
modules extract the neighbours with a fixed one-hot 3x3 convolution per dilation and materialise the whole
(B, C, P, H, W) neighbour stack at every iteration; here the neighbours are slices of one replicate-padded copy, and
the iteration accumulates ``K_p · slice_p`` in place (memory B·C·H·W instead of B·C·P·H·W).

Row sums of K (checked by the tests): PAMR 1, VARM 0.99 (its ``- 0.01·softmax(g)`` gradient term), PAR 1.01 (its
``+ 0.01·softmax(pos)`` positional term); a spatially constant mask is therefore scaled by 1, 0.99ⁿ and 1.01ⁿ.

Shapes: B batch, C / K channels, H × W map, P = 8·len(dilations). Every tensor is created on the inputs' device and
dtype; nothing here has learnable state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)   # RTC contrast_train.py: VARM(num_iter=10, dilations=[1,...,24])
N_ITER = 10
STD_EPS = 1e-8                                      # the 1e-8 added to every std in the three upstream modules
#: (dy, dx) of the 8 neighbours of the 3x3 stencil, in the upstream kernel order TL, T, TR, L, R, BL, B, BR.
OFFSETS8: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

VARM_SCALE = 4.0      # VARM.py: ref = -((|dI| / (std + 1e-8)) * 4) ** 2 (its unused self.w1 = 0.3)
VARM_GRAD_W = 0.01    # VARM.py: self.w2
PAR_W1 = 0.3          # PAR.py: self.w1
PAR_W2 = 0.01         # PAR.py: self.w2
PAMR_STD_SCALE = 0.1  # pamr.py: -|dI| / (1e-8 + 0.1 * std)


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    ds = tuple(int(d) for d in dilations)
    if not ds or any(d < 1 for d in ds) or any(d != float(x) for d, x in zip(ds, dilations)):
        raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {list(dilations)}")
    return ds


def _check_image(img: torch.Tensor, what: str = "img") -> None:
    if img.dim() != 4:
        raise ValueError(f"{what} must be (B, C, H, W), got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {img.dtype}")


def neighbours(x: torch.Tensor, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """The P = 8·len(dilations) dilated neighbours of every pixel, borders replicated (centre excluded).

    x: (B, C, H, W) -> (B, C, P, H, W); entry ``8·i + k`` is ``x[..., clamp(y + dy_k·d_i), clamp(x + dx_k·d_i)]`` with
    (dy_k, dx_k) = :data:`OFFSETS8` (TL, T, TR, L, R, BL, B, BR) and d_i = ``dilations[i]``.
    Same as the upstream ``get_dilated_neighbors`` (``ChunyanWang1/RTC`` ``network/VARM.py``, ``network/PAR.py``;
    ``LocalAffinityCopy`` in ``network/pamr.py``): replicate padding by d and a one-hot 3x3 convolution of dilation
    d. Here: one replicate padding by max(d) and slicing (padding by more than d and taking the same clamped
    indices is the same thing).
    """
    _check_image(x, "x")
    return torch.stack(list(_neighbour_views(x, _check_dilations(dilations))), 2)


def _neighbour_views(x: torch.Tensor, dilations: tuple[int, ...]):
    """Yield the P neighbour maps of x (B, C, H, W) as (B, C, H, W) views of one replicate-padded copy."""
    h, w = x.shape[-2:]
    r = max(dilations)
    xp = F.pad(x, [r] * 4, mode="replicate")
    for d in dilations:
        for dy, dx in OFFSETS8:
            y0, x0 = r + dy * d, r + dx * d
            yield xp[..., y0:y0 + h, x0:x0 + w]


def _image_std(nb: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the neighbour axis: (B, C, P, H, W) -> (B, C, 1, H, W) (``torch.std(.., dim=2)``)."""
    return torch.std(nb, dim=2, keepdim=True, unbiased=True)


def varm_kernel(img: torch.Tensor, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """VARM affinity weights from a [0, 1] RGB image: (B, 3, H, W) -> (B, P, H, W), each pixel's weights sum to 0.99.

    ``ChunyanWang1/RTC`` ``network/VARM.py::VARM.forward``, with I_p the neighbours of the image (:func:`neighbours`)
    and σ their unbiased std over p (per channel):

    - a_p = mean_ch( -(4·|I_p - I| / (σ + 1e-8))² );
    - g_p = mean_ch( (I_p - I_p↓)² + (I_p - I_p→)² ), the squared forward differences of each neighbour map along
      H and along W, the last row / column replicated (difference 0 there);
    - K = softmax_p(a) - 0.01·softmax_p(g).
    """
    _check_image(img)
    nb = neighbours(img, dilations)                                      # (B, 3, P, H, W)
    a = -((nb - img.unsqueeze(2)).abs() / (_image_std(nb) + STD_EPS) * VARM_SCALE) ** 2
    g = torch.zeros_like(nb)
    g[..., :-1, :] = (nb[..., :-1, :] - nb[..., 1:, :]) ** 2
    g[..., :, :-1] += (nb[..., :, :-1] - nb[..., :, 1:]) ** 2
    return F.softmax(a.mean(1), dim=1) - VARM_GRAD_W * F.softmax(g.mean(1), dim=1)


def par_positions(dilations: Sequence[int], device=None, dtype=None) -> torch.Tensor:
    """PAR's neighbour distances (P,): d for the axial neighbours (T, L, R, B), d·√2 for the diagonal ones
    (``ChunyanWang1/RTC`` ``network/PAR.py::PAR.get_pos``)."""
    ds = _check_dilations(dilations)
    unit = [math.sqrt(2.0) if dy and dx else 1.0 for dy, dx in OFFSETS8]
    return torch.tensor(unit, device=device, dtype=dtype).repeat(len(ds)) * torch.tensor(
        ds, device=device, dtype=dtype).repeat_interleave(8)


def par_kernel(img: torch.Tensor, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """PAR affinity weights from a [0, 1] RGB image: (B, 3, H, W) -> (B, P, H, W), each pixel's weights sum to 1.01.

    ``ChunyanWang1/RTC`` ``network/PAR.py::PAR.forward``: with I_p, σ as in :func:`varm_kernel`, pos_p the distance
    of neighbour p (:func:`par_positions`) and σ_pos its unbiased std over p,
    K = softmax_p(mean_ch(-(|I_p - I| / (σ + 1e-8) / 0.3)²)) + 0.01·softmax_p(-(pos_p / (σ_pos + 1e-8) / 0.3)²).
    The positional term is the same at every pixel.
    """
    _check_image(img)
    nb = neighbours(img, dilations)
    aff = -((nb - img.unsqueeze(2)).abs() / (_image_std(nb) + STD_EPS) / PAR_W1) ** 2
    pos = par_positions(dilations, device=img.device, dtype=img.dtype)
    pos_aff = -(pos / (torch.std(pos, unbiased=True) + STD_EPS) / PAR_W1) ** 2
    return F.softmax(aff.mean(1), dim=1) + PAR_W2 * F.softmax(pos_aff, dim=0)[None, :, None, None]


def pamr_kernel(img: torch.Tensor, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """PAMR affinity weights from an image: (B, C, H, W) -> (B, P, H, W), each pixel's weights sum to 1.

    ``ChunyanWang1/RTC`` ``network/pamr.py::PAMR.forward``: K = softmax_p(mean_ch(-|I - I_p| / (1e-8 + 0.1·σ9))),
    where σ9 is the unbiased std (per channel) over the full 3x3 stencils of all dilations, i.e. the P neighbours
    plus the centre pixel once per dilation (``LocalStDev``: 9·len(dilations) values).
    """
    _check_image(img)
    ds = _check_dilations(dilations)
    nb = neighbours(img, ds)
    centre = img.unsqueeze(2)
    stencils = torch.cat([nb, centre.expand(-1, -1, len(ds), -1, -1)], 2)  # std ignores the order
    aff = -(centre - nb).abs() / (STD_EPS + PAMR_STD_SCALE * _image_std(stencils))
    return F.softmax(aff.mean(1), dim=1)


#: kernel name -> kernel function (img (B, 3, H, W), dilations) -> (B, P, H, W)
PIXEL_REFINERS: dict[str, Callable[[torch.Tensor, Sequence[int]], torch.Tensor]] = {
    "varm": varm_kernel,
    "par": par_kernel,
    "pamr": pamr_kernel,
}


def propagate(masks: torch.Tensor, kernel: torch.Tensor, dilations: Sequence[int] = DILATIONS,
              n_iter: int = N_ITER) -> torch.Tensor:
    """``n_iter`` steps of ``m <- sum_p K_p · neighbours(m)_p``.

    masks (B, K, H, W), kernel (B, P, H, W) -> (B, K, H, W).

    The loop of the upstream ``forward`` (``ChunyanWang1/RTC`` ``network/VARM.py``), accumulated over p in place
    instead of stacking the (B, K, P, H, W) neighbours.
    """
    _check_image(masks, "masks")
    ds = _check_dilations(dilations)
    b, _, h, w = masks.shape
    if kernel.shape != (b, 8 * len(ds), h, w):
        raise ValueError(f"kernel must be (B, P, H, W) = {(b, 8 * len(ds), h, w)} for masks {tuple(masks.shape)} "
                         f"and {len(ds)} dilations, got {tuple(kernel.shape)}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    kernel = kernel.to(masks.dtype).unsqueeze(2)                         # (B, P, 1, H, W)
    for _ in range(int(n_iter)):
        out = torch.zeros_like(masks)
        for p, view in enumerate(_neighbour_views(masks, ds)):
            out.addcmul_(kernel[:, p], view)
        masks = out
    return masks


def refine_masks(masks: torch.Tensor, img: torch.Tensor, kind: str = "varm", n_iter: int = N_ITER,
                 dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """Refine masks (B, K, h, w) with the ``kind`` affinities of img (B, 3, H, W) -> (B, K, H, W).

    As the upstream ``forward(imgs, masks)`` of all three modules (``ChunyanWang1/RTC`` ``network/VARM.py``,
    ``network/PAR.py``, ``network/pamr.py``): the masks are first resized bilinearly (align_corners=True) to the image
    size, the kernel (:data:`PIXEL_REFINERS`) is computed once, then :func:`propagate` runs ``n_iter`` steps.
    VARM and PAR expect the [0, 1] RGB image.
    """
    if kind not in PIXEL_REFINERS:
        raise ValueError(f"unknown pixel refiner {kind!r}; choose one of {sorted(PIXEL_REFINERS)}")
    _check_image(img)
    _check_image(masks, "masks")
    if masks.shape[0] != img.shape[0]:
        raise ValueError(f"masks {tuple(masks.shape)} and img {tuple(img.shape)} differ in batch size")
    ds = _check_dilations(dilations)
    size = tuple(img.shape[-2:])
    if tuple(masks.shape[-2:]) != size:  # (same size: align_corners=True is the identity)
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
    return propagate(masks, PIXEL_REFINERS[kind](img, ds), ds, n_iter)


class PixelRefiner(nn.Module):
    """:func:`refine_masks` as a module: ``forward(img (B, 3, H, W), masks (B, K, h, w)) -> (B, K, H, W)``.

    The argument order of the upstream modules (``ChunyanWang1/RTC`` ``network/VARM.py::VARM``,
    ``network/PAR.py::PAR``, ``network/pamr.py::PAMR``); no parameters and no buffers (the upstream shift kernels
    are constants here).
    """

    def __init__(self, kind: str = "varm", n_iter: int = N_ITER, dilations: Sequence[int] = DILATIONS):
        super().__init__()
        if kind not in PIXEL_REFINERS:
            raise ValueError(f"unknown pixel refiner {kind!r}; choose one of {sorted(PIXEL_REFINERS)}")
        if n_iter < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        self.kind, self.n_iter, self.dilations = kind, int(n_iter), _check_dilations(dilations)

    def forward(self, img: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return refine_masks(masks, img, self.kind, self.n_iter, self.dilations)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_iter={self.n_iter}, dilations={list(self.dilations)}"
