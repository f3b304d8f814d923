"""MCTformer (Xu et al. CVPR 2022) op core, groundwork for its method module. Upstream:
``xulianuwa/MCTformer`` branch ``MCTformerPlus`` (the V1/V2 code; file::function citations below are in it).

Pure tensor functions (devices and dtypes follow the inputs). Shapes: B batch, C class tokens (= foreground
classes), h x w the patch grid (row-major: patch (r, q) is token ``C + r * w + q``), N = C + h w tokens, L blocks.

- :func:`interpolate_pos_embed` (``models.py::MCTformerV2.interpolate_pos_encoding``): class slots kept, the patch grid
  resized bicubically (DINO's +0.1 trick);
- :func:`expand_deit_pos_embed` / :func:`expand_cls_token` (``main.py::main``, ``--finetune``): DeiT-S (1 class
  token) to C class tokens;
- :func:`class_to_patch_maps` (``models.py::MCTformerV2.forward``, M): head-averaged class-to-patch attention summed
  over the last K blocks;
- :func:`patch_affinity` (``MCTformerV2.forward`` + ``engine.py::generate_attention_maps_ms``, P): head-averaged
  patch-to-patch attention summed over all blocks;
- :func:`fuse_maps` (``MCTformerV2.forward``, ``attention_type``): V2's ``M * ReLU(Z)`` (``fused``), ``ReLU(Z)``
  (``patchcam``) or ``M``;
- :func:`refine_with_affinity` (``engine.py::generate_attention_maps_ms``, ``--patch-attn-refine``):
  ``R[c, i] = sum_j P[i, j] F[c, j]``;
- :func:`minmax_per_class` (``engine.py::generate_attention_maps_ms``): per present class (S - min) /
  (max - min + 1e-8), absent classes 0;
- :func:`greedy_threshold_search` (``evaluation.py``, ``__main__`` with ``--curve``): the reference's curve search,
  which stops at the first non-improvement.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

MINMAX_EPS = 1e-8


def interpolate_pos_embed(pos_embed: torch.Tensor, n_cls: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(1, n_cls + g*g, D) learned table on a square g x g grid -> (1, n_cls + h*w, D) for a (h, w) grid.

    The class slots are returned unchanged; the patch part is reshaped to (D, g, g) and resized bicubically with
    scale factors ((h + 0.1) / g, (w + 0.1) / g) (the DINO trick the reference uses), then checked to be exactly
    (h, w). The same grid returns the table itself.
    """
    n_patch = pos_embed.shape[1] - n_cls
    g = int(round(n_patch ** 0.5))
    if g * g != n_patch:
        raise ValueError(f"the patch part of pos_embed has {n_patch} entries, not a square grid")
    h, w = grid_hw
    if (h, w) == (g, g):
        return pos_embed
    cls, patch = pos_embed[:, :n_cls], pos_embed[:, n_cls:]
    d = pos_embed.shape[-1]
    grid = patch.reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic",
                         align_corners=False).to(pos_embed.dtype)
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, d)], 1)


def expand_deit_pos_embed(pos_embed: torch.Tensor, n_cls: int, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """DeiT's (1, 1 + g*g, D) table -> (1, n_cls + h*w, D): the class slot repeated ``n_cls`` times, the patch grid
    resized bicubically to ``grid_hw`` (unchanged when it is the same or None)."""
    one = interpolate_pos_embed(pos_embed, 1, grid_hw) if grid_hw is not None else pos_embed
    return torch.cat([one[:, :1].expand(-1, n_cls, -1), one[:, 1:]], 1)


def expand_cls_token(cls_token: torch.Tensor, n_cls: int) -> torch.Tensor:
    """(1, 1, D) -> (1, n_cls, D): the DeiT class token repeated for every class."""
    return cls_token.expand(-1, n_cls, -1).clone()


def _head_mean(attn: torch.Tensor) -> torch.Tensor:
    if attn.dim() != 4:
        raise ValueError(f"attention must be (B, heads, N, N), got {tuple(attn.shape)}")
    return attn.mean(1)


def class_to_patch_maps(attns: Sequence[torch.Tensor], n_cls: int, grid_hw: tuple[int, int],
                        last_k: int = 3) -> torch.Tensor:
    """``models.py::MCTformerV2.forward`` ``mtatt`` (M): sum over the last ``last_k`` blocks of the head-averaged
    ``A[:, :C, C:]`` -> (B, C, h, w).

    attns: per block (B, heads, N, N) post-softmax attention (rows = queries). Rows are class tokens, columns
    patches in row-major order. Each summand is in [0, 1], so 0 <= M <= last_k.
    """
    if not 1 <= last_k <= len(attns):
        raise ValueError(f"last_k must be in 1..{len(attns)}, got {last_k}")
    h, w = grid_hw
    m = sum(_head_mean(a)[:, :n_cls, n_cls:] for a in attns[-last_k:])
    return m.reshape(m.shape[0], n_cls, h, w)


def patch_affinity(attns: Sequence[torch.Tensor], n_cls: int) -> torch.Tensor:
    """``patch_attn`` of ``MCTformerV2.forward`` summed in ``engine.py::generate_attention_maps_ms`` (P): sum over all
    blocks of the head-averaged ``A[:, C:, C:]`` -> (B, hw, hw); row i = query patch i (rows sum to at most the number
    of blocks)."""
    return sum(_head_mean(a)[:, n_cls:, n_cls:] for a in attns)


def fuse_maps(m: torch.Tensor, z: torch.Tensor | None, attention_type: str = "fused") -> torch.Tensor:
    """``models.py::MCTformerV2.forward`` localisation maps (B, C, h, w): ``fused`` = M * ReLU(Z) (Z detached),
    ``patchcam`` = ReLU(Z), else M. V1 (no PatchCAM head, ``z`` None) always gives M."""
    if z is None or attention_type not in ("fused", "patchcam"):
        return m
    zr = F.relu(z.detach())
    return m * zr if attention_type == "fused" else zr


def refine_with_affinity(maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """``engine.py::generate_attention_maps_ms`` (``--patch-attn-refine``): (B, C, h, w) maps, (B, hw, hw) raw patch
    affinity -> ``R[b, c, i] = sum_j P[b, i, j] F[b, c, j]``."""
    b, c, h, w = maps.shape
    return torch.einsum("bij,bcj->bci", affinity.to(maps.dtype), maps.reshape(b, c, h * w)).reshape(b, c, h, w)


def minmax_per_class(s: torch.Tensor, present: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """``engine.py::generate_attention_maps_ms``: (C, H, W) summed maps, (C,) 0/1 labels -> per present class
    (S - min) / (max - min + eps), absent 0."""
    flat = s.reshape(s.shape[0], -1)
    lo, hi = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    out = (s - lo) / (hi - lo + eps)
    return out * (present.view(-1, 1, 1) > 0).to(out.dtype)


def greedy_threshold_search(miou_at: Callable[[float], float], start: int = 0, end: int = 60) -> tuple[float, float, list]:
    """``evaluation.py`` ``--curve``: t = i/100 for i in [start, end), stopping at the first t whose mIoU does not
    improve on the best so far (a greedy search that assumes a unimodal curve). Returns (best t, best mIoU, evaluated
    mIoUs).

    The rule itself lives in :mod:`wsss_core.metrics.search` (``stages.eval.search: greedy``); this fixes the
    reference's threshold list."""
    from ..metrics.search import greedy_threshold_search as _greedy_search

    return _greedy_search(miou_at, [i / 100 for i in range(start, end)])
