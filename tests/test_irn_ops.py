"""IRN path index, edge-to-affinity and pair labels (``chenqi1126/SIPE`` ``tool/indexing.py::PathIndex``,
``edge_to_affinity``; ``data/data_voc.py::GetAffinityLabelFromIndices``) on tiny CPU tensors."""

from __future__ import annotations

import torch

from wsss_core.refine import affinity as aff
from wsss_core.refine.irn_ops import edge_to_affinity, path_of, search_directions


def test_direction_counts_order_and_paths():
    assert len(search_directions(10)) == 152 and len(search_directions(5)) == 34
    first = [d for d, _ in search_directions(10)[:7]]
    assert first == [(0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (1, -1), (1, 1)]
    assert path_of(2, 1) == [(2, 1), (1, 1), (2, 0), (0, 1), (1, 0), (0, 0)]
    assert {d for d, _ in search_directions(5)} == set(aff.pair_offsets(5))  # the same half-plane as PSA


def test_sources_count_and_edge_to_affinity():
    assert edge_to_affinity(torch.zeros(1, 10, 14), 5).shape == (1, 34, 36)  # 6 x 6 sources (r_f = 4)
    assert torch.equal(edge_to_affinity(torch.zeros(2, 10, 14), 5), torch.ones(2, 34, 36))
    edge = torch.zeros(1, 10, 14)
    edge[0, 2, 6] = 1.0
    a = edge_to_affinity(edge, 5)
    dirs = search_directions(5)
    frm, to = aff.pair_indices(10, 14, 5, [d for d, _ in dirs])
    for k, ((dy, dx), path) in enumerate(dirs):
        for s in range(frm.numel()):
            y, x = divmod(int(frm[s]), 14)
            crosses = any((y + py, x + px) == (2, 6) for py, px in path)
            assert a[0, k, s] == (0.0 if crosses else 1.0)


def test_irn_pair_labels_are_disjoint_and_skip_invalid():
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([0, 5, 7, 255])[torch.randint(0, 4, (2, 8, 12), generator=g)]
    offsets = [d for d, _ in search_directions(5)]
    bg, fg, neg = aff.pair_labels(lab, 5, offsets, ignore_at_least=21)
    assert float((bg * fg).sum() + (bg * neg).sum() + (fg * neg).sum()) == 0
    frm, to = aff.pair_indices(8, 12, 5, offsets)
    flat = lab.reshape(2, -1)
    valid = (flat[:, frm][:, None] < 21) & (flat[:, to] < 21)
    assert torch.equal((bg + fg + neg).bool(), valid)
