"""IRN (Ahn et al., CVPR 2019) op core, groundwork for the IRN refinement stage. Upstream: the
IRN copy in ``chenqi1126/SIPE`` (``tool/indexing.py``, ``network/resnet50_irn.py``), adapted from ``jiwoon-ahn/irn``.

- :func:`path_of` / :func:`search_directions` (``tool/indexing.py::PathIndex``): the half-plane neighbour directions
  within radius R, each with the integer points of its path, ordered by path length then generation order (152
  directions at R = 10, 34 at R = 5);
- :func:`edge_to_affinity` (``tool/indexing.py::edge_to_affinity``): ``a(i, j) = 1 - max_{k in path(i -> j)} edge(k)``
  for every source pixel and direction, sources as in :func:`wsss_core.refine.affinity.pair_indices`;
- pair labels: :func:`wsss_core.refine.affinity.pair_labels` with ``offsets=`` the IRN order
  (``data/data_voc.py::GetAffinityLabelFromIndices``).
"""

from __future__ import annotations

import functools
import math

import torch


def path_of(dy: int, dx: int) -> list[tuple[int, int]]:
    """Integer points of the bounding box of (0, 0)-(dy, dx) within squared distance < 1 of the line through
    them, endpoints included, sorted by decreasing |y| + |x| (element 0 is the destination; ties keep the
    row-major generation order)."""
    norm = dy * dy + dx * dx
    pts = [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
           if (dy * x - dx * y) ** 2 / norm < 1]
    return sorted(pts, key=lambda p: -(abs(p[0]) + abs(p[1])))


@functools.lru_cache(maxsize=8)
def search_directions(radius: float = 10) -> tuple[tuple[tuple[int, int], tuple[tuple[int, int], ...]], ...]:
    """``((dy, dx), path)`` pairs: (0, x) for 1 <= x < R, then (y, x) for 1 <= y < R, -R < x < R with
    x² + y² < R², grouped by path length (stable, so generation order within a group). Computed once per
    radius; the result is an immutable shared table."""
    r = int(math.ceil(radius))
    dirs = [(0, x) for x in range(1, r)]
    dirs += [(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < radius * radius]
    with_paths = [(d, tuple(path_of(*d))) for d in dirs]
    return tuple(sorted(with_paths, key=lambda dp: len(dp[1])))


def edge_to_affinity(edge: torch.Tensor, radius: float = 10) -> torch.Tensor:
    """(B, h, w) boundary probabilities (sigmoid of the edge logits) -> affinities (B, n_dir, n_src).

    Sources: rows [0, h - r_f), columns [r_f, w - r_f) with r_f = ceil(R) - 1, flattened row-major.
    """
    b, h, w = edge.shape
    rf = int(math.ceil(radius)) - 1
    nh, nw = h - rf, w - 2 * rf
    if nh <= 0 or nw <= 0:
        return edge.new_zeros((b, len(search_directions(radius)), 0))
    out = []
    for _, path in search_directions(radius):
        m = torch.stack([edge[:, py:py + nh, rf + px:rf + px + nw] for py, px in path]).amax(0)
        out.append(1 - m.reshape(b, -1))
    return torch.stack(out, 1)
