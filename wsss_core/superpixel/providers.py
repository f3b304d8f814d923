"""Where Q comes from: one interface over a trained SCN and two classical stand-ins.

``provider.q(x)`` maps a normalised image batch x (B, 3, H, W) (H, W multiples of 16; ``provider.mean/std`` undo the
normalisation where a back end needs RGB) to Q (B, 9, H, W) on x's device. Back ends:

- ``scn``: a trained superpixel network (:class:`~wsss_core.superpixel.scn.SpixelNet`), eval mode, no gradient;
- ``soft_slic``: a non-learned soft SLIC on the grid (SSN, Jampani et al., ECCV 2018, github.com/NVlabs/ssn_superpixels:
  features ``[0.26 LAB, (2.5 / S) (y, x)]``, centres initialised as the cell means, ``iters`` E/M steps with the
  softmax over the in-grid candidates only): exact Q format, no mass leaves the grid, deterministic;
- ``skimage_slic``: scikit-image's SLIC with about one segment per cell, each segment anchored to the cell of its
  centroid (offsets clamped to the 3x3 neighbourhood), softened by one soft-SLIC E-step with the resulting cell means.

Stand-ins change the absolute numbers: reports name the back end.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import ops

BACKENDS = ("scn", "soft_slic", "skimage_slic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation: (B, 3, H, W) -> (B, H, W, 3) uint8."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    rgb = ((x * s + m) * 255).round().clamp(0, 255)
    return rgb.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def slic_features(rgb: np.ndarray, cell: int = ops.CELL, color_scale: float = 0.26,
                  pos_scale: float = 2.5) -> torch.Tensor:
    """SSN pixel features ``[color_scale * LAB, (pos_scale / S) * (y, x)]``: (B, H, W, 3) uint8 -> (B, 5, H, W)
    float32."""
    from skimage.color import rgb2lab

    b, hh, ww, _ = rgb.shape
    lab = torch.from_numpy(np.stack([rgb2lab(im) for im in rgb]).astype(np.float32)).permute(0, 3, 1, 2)
    ys, xs = torch.meshgrid(torch.arange(hh, dtype=torch.float32), torch.arange(ww, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([ys, xs])[None].expand(b, 2, hh, ww) * (pos_scale / cell)
    return torch.cat([color_scale * lab, pos], 1)


def _inside9(hh: int, ww: int, cell: int, like: torch.Tensor) -> torch.Tensor:
    """(9, H, W) bool: the candidate cell c(p) + d_k is in the grid."""
    h, w = hh // cell, ww // cell
    cy = torch.arange(hh, device=like.device)[:, None] // cell
    cx = torch.arange(ww, device=like.device)[None, :] // cell
    return torch.stack([(cy + dy >= 0) & (cy + dy < h) & (cx + dx >= 0) & (cx + dx < w) for dy, dx in ops.OFFSETS9])


def soft_assign(phi: torch.Tensor, centres: torch.Tensor, cell: int = ops.CELL) -> torch.Tensor:
    """One soft-SLIC E-step: ``Q_k(p) = softmax_k(-||phi(p) - centre(c(p) + d_k)||^2)`` over in-grid k.

    phi: (B, C, H, W), centres: (B, C, h, w) -> Q (B, 9, H, W).
    """
    hh, ww = phi.shape[-2:]
    dist = []
    for dy, dx in ops.OFFSETS9:
        c = ops.shift(centres, -dy, -dx).repeat_interleave(cell, -2).repeat_interleave(cell, -1)
        dist.append(((phi - c) ** 2).sum(1))
    logits = -torch.stack(dist, 1)
    logits = logits.masked_fill(~_inside9(hh, ww, cell, phi)[None], float("-inf"))
    return torch.softmax(logits, 1)


def soft_slic(phi: torch.Tensor, iters: int = 5, cell: int = ops.CELL) -> torch.Tensor:
    """Grid soft SLIC on features phi (B, C, H, W) -> Q (B, 9, H, W): centres = cell means, then ``iters`` E/M steps."""
    ops.grid_size(phi[:, :1].expand(-1, 9, -1, -1), cell)
    centres = torch.nn.functional.avg_pool2d(phi, cell)
    q = soft_assign(phi, centres, cell)
    for _ in range(iters - 1):
        q = soft_assign(phi, ops.pool(phi, q, cell), cell)
    return q


def skimage_slic_q(rgb: np.ndarray, phi: torch.Tensor, cell: int = ops.CELL, compactness: float = 10.0,
                   sigma: float = 1.0) -> torch.Tensor:
    """scikit-image SLIC anchored to the grid and softened: (B, H, W, 3) uint8 and its features -> Q (B, 9, H, W)."""
    from skimage.segmentation import slic

    b, hh, ww, _ = rgb.shape
    h, w = hh // cell, ww // cell
    hard = torch.zeros(b, 9, hh, ww)
    cy = np.arange(hh)[:, None] // cell
    cx = np.arange(ww)[None, :] // cell
    for i, im in enumerate(rgb):
        seg = slic(im, n_segments=h * w, compactness=compactness, sigma=sigma, start_label=0, convert2lab=True)
        n = int(seg.max()) + 1
        count = np.bincount(seg.ravel(), minlength=n).astype(np.float64)
        ay = (np.bincount(seg.ravel(), np.broadcast_to(np.arange(hh)[:, None], seg.shape).ravel(), n)
              / np.maximum(count, 1)) // cell
        ax = (np.bincount(seg.ravel(), np.broadcast_to(np.arange(ww)[None, :], seg.shape).ravel(), n)
              / np.maximum(count, 1)) // cell
        dy = np.clip(ay[seg] - cy, -1, 1).astype(np.int64)
        dx = np.clip(ax[seg] - cx, -1, 1).astype(np.int64)
        k = torch.from_numpy((dy + 1) * 3 + (dx + 1))
        hard[i].scatter_(0, k[None], 1.0)
    return soft_assign(phi, ops.pool(phi, hard, cell), cell)


class SuperpixelProvider:
    """Q maps from one back end. ``q(x)``: normalised (B, 3, H, W) -> (B, 9, H, W) float32 on x's device."""

    def __init__(self, backend: str, scn: torch.nn.Module | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, iters: int = 5, color_scale: float = 0.26,
                 pos_scale: float = 2.5):
        if backend not in BACKENDS:
            raise ValueError(f"superpixel back end must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if backend == "scn" and scn is None:
            raise ValueError("the 'scn' back end needs a trained superpixel network")
        self.backend, self.scn = backend, scn
        self.mean, self.std = tuple(mean), tuple(std)
        self.iters, self.color_scale, self.pos_scale = iters, color_scale, pos_scale
        if scn is not None:
            scn.eval()
            for p in scn.parameters():
                p.requires_grad_(False)

    def describe(self) -> dict:
        """What the report records about the back end."""
        d = {"backend": self.backend}
        if self.backend != "scn":
            d.update(color_scale=self.color_scale, pos_scale=self.pos_scale)
            if self.backend == "soft_slic":
                d["iters"] = self.iters
        return d

    @torch.no_grad()
    def q(self, x: torch.Tensor) -> torch.Tensor:
        hh, ww = x.shape[-2:]
        if hh % ops.CELL or ww % ops.CELL:
            raise ValueError(f"image of size {hh}x{ww}: superpixels need height and width multiples of {ops.CELL}")
        if self.backend == "scn":
            dev = next(self.scn.parameters()).device
            return self.scn(x.to(dev)).to(x.device, torch.float32)
        rgb = to_rgb_uint8(x.float(), self.mean, self.std)
        phi = slic_features(rgb, ops.CELL, self.color_scale, self.pos_scale)
        if self.backend == "soft_slic":
            q = soft_slic(phi, self.iters)
        else:
            q = skimage_slic_q(rgb, phi)
        return q.to(x.device)
