"""AffinityNet / random walk (PSA; ``usr922/wseg`` master ``aff_*.py``, ``xulianuwa/MCTformer`` ``psa/``): pairs,
labels, loss, transition matrix."""

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


# ----------------------------------------------------------------------------- random-walk operator properties

def _random_symmetric_affinity(n: int, seed: int) -> torch.Tensor:
    """(n, n) symmetric affinities in (0, 1] with 1 on the diagonal (like :func:`aff.dense_affinity`)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    a = (a + a.t()) / 2
    a.fill_diagonal_(1.0)
    return a


@pytest.mark.parametrize("logt", [0, 6])
def test_transition_matrix_is_row_stochastic_as_a_propagation_operator(logt):
    # random_walk computes V . T: destination j receives sum_i V[:, i] T[i, j], so j's weights over the sources
    # are column j of T. As a propagation operator (destination x source) that is T.t(), whose rows must sum to 1.
    a = _random_symmetric_affinity(20, 0)
    t = aff.transition_matrix(a, beta=2.0, logt=logt)
    torch.testing.assert_close(t.t().sum(1), torch.ones(20, dtype=torch.float64))
    assert bool((t >= 0).all())
    if logt == 0:  # the orientation matters: T's own rows do not sum to 1 for a non-uniform A
        assert float((t.sum(1) - 1).abs().max()) > 1e-3
    # hence every propagated score is a convex combination of the sources: within [min V, max V] per class
    v = torch.rand(3, 1, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rw = aff.random_walk(v, t)
    assert bool((rw >= v.amin((1, 2), keepdim=True) - 1e-12).all())
    assert bool((rw <= v.amax((1, 2), keepdim=True) + 1e-12).all())


def test_random_walk_does_not_leak_across_disconnected_blocks():
    n1, n2 = 6, 9
    a = torch.zeros(n1 + n2, n1 + n2, dtype=torch.float64)
    a[:n1, :n1] = _random_symmetric_affinity(n1, 2)
    a[n1:, n1:] = _random_symmetric_affinity(n2, 3)
    t = aff.transition_matrix(a, beta=8.0, logt=6)
    assert bool((t[:n1, n1:] == 0).all()) and bool((t[n1:, :n1] == 0).all())
    g = torch.Generator().manual_seed(4)
    v = torch.rand(4, 1, n1 + n2, generator=g, dtype=torch.float64)
    rw = aff.random_walk(v, t)
    # block 1 alone: the walk restricted to it depends only on V of block 1 ...
    alone = aff.random_walk(v[..., :n1], aff.transition_matrix(a[:n1, :n1], beta=8.0, logt=6))
    torch.testing.assert_close(rw[..., :n1], alone)
    v2 = v.clone()
    v2[..., n1:] = torch.rand(4, 1, n2, generator=g, dtype=torch.float64) * 100
    torch.testing.assert_close(aff.random_walk(v2, t)[..., :n1], rw[..., :n1], rtol=0, atol=0)
    # ... and a V that is zero on block 2 stays exactly zero there
    v3 = v.clone()
    v3[..., n1:] = 0
    assert bool((aff.random_walk(v3, t)[..., n1:] == 0).all())


def test_six_squarings_equal_the_64th_power():
    torch.manual_seed(0)
    feat = torch.rand(1, 8, 9, 11)
    a = aff.dense_affinity(aff.pair_affinities(feat, 5)[0], 9, 11, 5).double()
    t1 = aff.transition_matrix(a, beta=8, logt=0)
    torch.testing.assert_close(aff.transition_matrix(a, beta=8, logt=6), torch.linalg.matrix_power(t1, 64),
                               atol=1e-5, rtol=0)


# ------------------------------------------------ la/ha labels (MCTformer engine.py, psa/voc12/data.py)

def _square_scene(h=40, w=40):
    """Dark image with a grey ring around a bright square; CAM 0.9 on the square, 0.3 on the ring, 0 outside."""
    image = np.full((h, w, 3), 20, np.uint8)
    cam = np.zeros((1, h, w), np.float32)
    image[6:34, 6:34], cam[0, 6:34, 6:34] = 120, 0.3      # ring (6 px wide)
    image[12:28, 12:28], cam[0, 12:28, 12:28] = 240, 0.9  # square
    return image, cam


def test_affinity_crf_default_is_the_old_label_crf_and_psa_softmax_is_selectable():
    from wsss_core.refine.crf import PRESETS, CRFParams
    from wsss_core.stages.affinity import AFF_CRF, affinity_crf

    assert AFF_CRF == CRFParams("labels", 3, 3, 80, 13, 10, 10, 0.7, label_unary="all", pairwise="utils") \
        == affinity_crf({})
    assert affinity_crf({"crf": {"preset": "psa_aff_label", "params": {}}}) == AFF_CRF
    assert affinity_crf({"crf": {"preset": "psa_softmax"}}) == PRESETS["psa_softmax"]
    assert affinity_crf({"crf": {"preset": "psa_softmax", "params": {"iters": 3}}}).iters == 3


def test_psa_softmax_la_ha_labels_are_monotone_and_confident_on_a_bright_square():
    pytest.importorskip("pydensecrf")
    from wsss_core.refine.crf import PRESETS, bg_power
    from wsss_core.stages.affinity import confident_labels, confident_scores

    image, cam = _square_scene()
    assert bool((bg_power(cam, 12) <= bg_power(cam, 1)).all())              # (1 - m)^12 <= (1 - m)^1
    keys, q_la, q_ha = confident_scores(image, np.array([5]), cam, 1, 12, PRESETS["psa_softmax"])
    assert q_la.shape == q_ha.shape == (2, 40, 40) and keys.tolist() == [5]
    bg_la, bg_ha = q_la.argmax(0) == 0, q_ha.argmax(0) == 0
    assert bool((bg_ha <= bg_la).all()) and bg_la.sum() > bg_ha.sum()      # confident bg (ha) within la's bg
    lab = confident_labels(image, np.array([5]), cam, 1, 12, PRESETS["psa_softmax"])
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 5, IGNORE_INDEX}
    assert (lab[14:26, 14:26] == 5).all()              # square: fg for la (0.9 > 0.1) and ha
    assert (lab[8:32, 8:10] == IGNORE_INDEX).all()     # ring: la says bg (0.7 > 0.3), ha says fg (0.3 > 0.7^12)
    assert (lab[:4] == 0).all() and (lab[:, :4] == 0).all()   # outside: bg for both


def test_psa_softmax_unary_gets_the_unnormalised_bg_cam_stack(monkeypatch):
    from wsss_core.refine import crf as crf_mod
    from wsss_core.stages.affinity import confident_scores

    seen = []
    monkeypatch.setattr(crf_mod, "dense_crf", lambda image, x, params, n_labels=None: seen.append(x) or x)
    image, cam = _square_scene(16, 16)
    cam = cam * 0.5
    confident_scores(image, np.array([5]), cam, 1, 12, crf_mod.PRESETS["psa_softmax"])
    m = cam.max(0)
    for x, alpha in zip(seen, (1, 12)):
        want = np.clip(np.concatenate([((1 - m) ** alpha)[None], cam]), 1e-5, 1)
        np.testing.assert_allclose(x, want, rtol=1e-6)
    assert abs(seen[1].sum(0) - 1).max() > 0.1           # not renormalised into a distribution


def test_block_mean_reduction_matches_a_hand_computed_mean_and_argmax():
    from wsss_core.stages.affinity import reduce_scores

    s = np.zeros((4, 16, 16), np.float32)      # [la bg, la fg, ha bg, ha fg], key 7; blocks (row, col) of 8 x 8
    s[0, :8, :8], s[1, :4, :8], s[2, :8, :8], s[3, :4, :8] = 0.3, 1.0, 0.01, 1.0
    # block (0, 1): 24 of 64 pixels are per-pixel la fg (1.0 > 0.6), but the la mean says bg (0.375 < 0.6)
    s[0, :8, 8:], s[1, :3, 8:], s[2, :8, 8:], s[3, :3, 8:] = 0.6, 1.0, 0.1, 1.0
    s[0, 8:, :8], s[2, 8:, :8] = 0.6, 0.9      # block (1, 0): both say bg
    # block (1, 1): zero padding -> no score
    assert aff.block_mean(s).shape == (4, 2, 2)
    np.testing.assert_allclose(aff.block_mean(s)[:, 0, 1], [0.6, 0.375, 0.1, 0.375])
    assert reduce_scores(s, np.array([7])).tolist() == [[7, IGNORE_INDEX], [0, IGNORE_INDEX]]
    # a random stack: explicit per-block loop
    rng = np.random.default_rng(0)
    r = rng.random((6, 24, 16)).astype(np.float32)
    mean = np.array([[[r[c, 8 * i:8 * i + 8, 8 * j:8 * j + 8].mean() for j in range(2)] for i in range(3)]
                     for c in range(6)])
    np.testing.assert_allclose(aff.block_mean(r), mean, rtol=1e-6)
    lut = np.array([0, 2, 9])
    want = aff.affinity_label_map(lut[mean[:3].argmax(0)], lut[mean[3:].argmax(0)])
    np.testing.assert_array_equal(reduce_scores(r, np.array([2, 9])), want)
    with pytest.raises(ValueError):
        aff.block_mean(r[:, :20])


# ----------------------------------------------------------------------------- stores with their own bg map

def test_own_bg_store_drops_key_0_for_labels_and_walk(tmp_path):
    pytest.importorskip("pydensecrf")
    from wsss_core.errors import ConfigError
    from wsss_core.refine.crf import PRESETS
    from wsss_core.stages.affinity import confident_labels, fg_cams, random_walk_labels, walk_bg

    image, cam = _square_scene(24, 24)
    own_bg = np.ones((1, 24, 24), np.float32)          # would turn everything into bg if it were used
    keys, cams = fg_cams(np.array([0, 5]), np.concatenate([own_bg, cam]))
    assert keys.tolist() == [5] and np.array_equal(cams, cam)
    for crf in (PRESETS["psa_aff_label"], PRESETS["psa_softmax"]):
        with_bg = confident_labels(image, np.array([0, 5]), np.concatenate([own_bg, cam]), 1, 12, crf, n_classes=21)
        np.testing.assert_array_equal(with_bg, confident_labels(image, np.array([5]), cam, 1, 12, crf, n_classes=21))
        assert (with_bg == 5).any()
    g = torch.Generator().manual_seed(0)
    far = lambda x: torch.randn(1, 16, x.shape[2] // 8, x.shape[3] // 8, generator=g) * 1e4  # noqa: E731
    walk = random_walk_labels(far, image, np.array([0, 5]), np.concatenate([own_bg, cam]), 0.5, torch.device("cpu"))
    np.testing.assert_array_equal(walk, random_walk_labels(far, image, np.array([5]), cam, 0.5, torch.device("cpu")))
    # the walk's constant bg: "auto" has no value for own-bg CAMs -> ConfigError naming the key; a number works
    ev = tmp_path / "cam_eval.json"
    ev.write_text('{"threshold": {"own_bg": true, "value": null}}')
    with pytest.raises(ConfigError, match=r"affinity\.bg_threshold"):
        walk_bg({"bg_threshold": "auto"}, str(ev))
    with pytest.raises(ConfigError, match=r"affinity\.bg_threshold"):
        walk_bg({"bg_threshold": "auto"}, None)
    assert walk_bg({"bg_threshold": 0.39}, str(ev))[0] == 0.39


@pytest.mark.parametrize("reduce", ["nearest", "block_mean"])
def test_affinity_dataset_label_reduction(tmp_path, reduce):
    pytest.importorskip("pydensecrf")
    from PIL import Image

    from wsss_core.errors import ConfigError
    from wsss_core.stages.affinity import AffinityDataset

    image, cam = _square_scene(40, 40)
    Image.fromarray(image).save(tmp_path / "a.png")

    class Info:
        def image_path(self, image_id):
            return tmp_path / f"{image_id}.png"

    cfg = {"la": 1, "ha": 12, "crop_size": 48, "crf": {"preset": "psa_softmax"}, "label_reduce": reduce}
    ds = AffinityDataset(Info(), ["a"], [], cfg)
    ds._store = {"a": (np.array([0, 5]), np.concatenate([np.ones_like(cam), cam]))}   # own-bg store
    item = ds[0]
    lab = item["label"].numpy()
    assert item["image"].shape == (3, 48, 48) and lab.shape == (6, 6)
    assert set(np.unique(lab)) <= {0, 5, IGNORE_INDEX} and (lab == 5).any() and (lab == 0).any()
    assert (lab == IGNORE_INDEX).any()                 # crop padding (40 < 48) and the ring
    with pytest.raises(ConfigError):
        AffinityDataset(Info(), ["a"], [], {**cfg, "label_reduce": "max"})


def test_affinity_crop_too_small_for_the_radius_is_a_config_error(tmp_path):
    from wsss_core.errors import ConfigError
    from wsss_core.stages.affinity import train_affinity
    from wsss_core.stages.job import Files, JobSettings

    job = JobSettings(prepared=str(tmp_path / "none"), splits={"train": "train"}, cfg={"radius": 5, "crop_size": 64},
                      device="cpu")
    with pytest.raises(ConfigError, match=r"crop_size 64 .* affinity\.radius 5"):
        train_affinity(job, Files(cams=[]), Files(model=str(tmp_path / "m.pt")))
