"""AffinityNet / random walk (PSA; ppc.md §9, psa_and_deeplab.md part A): pairs, labels, loss, transition matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_images
from wsss_core.data.io import IGNORE_INDEX
from wsss_core.refine import affinity as aff


def test_pair_offsets_and_indices_match_the_spec():
    offs = aff.pair_offsets(5)
    assert len(offs) == 34 and offs[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert all(dx * dx + dy * dy < 25 for dy, dx in offs) and len(set(offs)) == 34
    frm, to = aff.pair_indices(56, 56, 5)
    assert frm.shape == (2496,) and to.shape == (34, 2496)
    assert int(to.max()) < 56 * 56 and int(to.min()) >= 0
    y, x = frm // 56, frm % 56
    assert int(y.max()) == 51 and int(x.min()) == 4 and int(x.max()) == 51


def test_affinity_label_map_rules():
    la = np.array([[0, 3, 3, 0]], np.uint8)
    ha = np.array([[0, 3, 0, 3]], np.uint8)
    # la bg -> ignored unless ha says bg; la fg kept unless ha says bg
    assert aff.affinity_label_map(la, ha).tolist() == [[0, 3, 0, IGNORE_INDEX]]


def test_pair_labels_are_exclusive_and_skip_ignored():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (2, 12, 12), generator=g)
    lab[0, :3] = IGNORE_INDEX
    bg, fg, neg = aff.pair_labels(lab, 5)
    assert bg.shape == (2, 34, (12 - 4) * (12 - 8))
    assert float((bg + fg + neg).max()) <= 1.0
    frm, to = aff.pair_indices(12, 12, 5)
    flat = lab.reshape(2, -1)
    lf, lt = flat[:, frm][:, None].expand(-1, 34, -1), flat[:, to]
    ign = (lf == IGNORE_INDEX) | (lt == IGNORE_INDEX)
    assert float((bg + fg + neg)[ign].sum()) == 0
    assert torch.equal(neg.bool(), (lf != lt) & ~ign)
    assert torch.equal(bg.bool(), (lf == 0) & (lt == 0))


def test_affinity_loss_zero_for_perfect_affinities_and_positive_otherwise():
    bg = torch.tensor([[1.0, 0, 0]])
    fg = torch.tensor([[0, 1.0, 0]])
    neg = torch.tensor([[0, 0, 1.0]])
    perfect = aff.affinity_loss(torch.tensor([[1.0, 1.0, 0.0]]), bg, fg, neg)
    assert float(perfect["loss"]) < 1e-4
    wrong = aff.affinity_loss(torch.tensor([[0.5, 0.5, 0.5]]), bg, fg, neg)
    torch.testing.assert_close(wrong["loss"], torch.tensor(np.log(2.0), dtype=torch.float32), atol=1e-3, rtol=0)


def test_transition_matrix_columns_sum_to_one_and_constant_cams_are_fixed():
    torch.manual_seed(0)
    feat = torch.rand(1, 8, 10, 12)
    a = aff.dense_affinity(aff.pair_affinities(feat, 5)[0], 10, 12, 5)
    assert torch.allclose(a, a.t()) and torch.all(a.diagonal() == 1)
    t = aff.transition_matrix(a.double(), beta=8, logt=6)
    torch.testing.assert_close(t.sum(0), torch.ones(120, dtype=torch.float64))
    const = torch.tensor([0.3, 0.7, 0.1]).view(3, 1, 1).expand(3, 10, 12).double()
    torch.testing.assert_close(aff.random_walk(const, t), const)


def test_affinity_is_one_for_identical_features_and_decays_with_distance():
    feat = torch.zeros(1, 4, 8, 12)
    feat[..., 6:] = 2.0
    a = aff.pair_affinities(feat, 5)
    assert float(a.max()) == 1.0 and float(a.min()) == pytest.approx(np.exp(-2.0), rel=1e-6)


def test_affinity_net_and_random_walk_labels(one_torch_thread):
    from wsss_core.stages.affinity import random_walk_labels

    torch.manual_seed(0)
    net = aff.build_affinity_net({"backbone": {"width": 0.0625, "weights": None}}).eval()
    assert net(random_images(1, 40, 48)).shape == (1, 448, 5, 6)
    assert aff.pair_indices(5, 6, 5)[1].shape == (34, 0)  # too small for radius 5: no pairs
    image = (np.random.default_rng(0).random((77, 93, 3)) * 255).astype(np.uint8)
    cams = np.zeros((2, 77, 93), np.float32)
    cams[0, :, :30] = 1.0
    cams[1, :, 60:] = 1.0
    lab = random_walk_labels(net, image, np.array([2, 5]), cams, 0.3, torch.device("cpu"))
    assert lab.shape == (77, 93) and set(np.unique(lab)) <= {0, 2, 5}
    # features far apart everywhere: affinities ~0, T = I, so the walk returns the (pooled) seeds unchanged
    g = torch.Generator().manual_seed(0)
    far = lambda x: torch.randn(1, 16, x.shape[2] // 8, x.shape[3] // 8, generator=g) * 1e4  # noqa: E731
    lab = random_walk_labels(far, image, np.array([2, 5]), cams, 0.3, torch.device("cpu"))
    assert (lab[:, :24] == 2).all() and (lab[:, 66:] == 5).all() and (lab[:, 36:56] == 0).all()
