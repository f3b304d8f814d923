"""Fidelity of the label CRFs and the AffinityNet labels / walk to the reference code (issue 15, items 4 and 5).

Oracles are pydensecrf itself and the reference procedures written out here the way the reference scripts run them:
usr922/wseg master ``contrast_infer.py::_crf`` / ``_crf_inference`` (``seam_label``), ``aff_prepare.py::
_crf_inference`` / ``_infer_crf_with_alpha`` (``psa_aff_label``), ``voc12/data.py::VOC12AffDataset`` (8x8 mean of the
CRF scores), ``network/resnet38_aff.py::Net.forward`` and ``aff_infer.py`` (walk radius, random walk); SIPE/IRN
``crf_inference_label`` (present classes) for the IRN stage's CRF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("pydensecrf")

import pydensecrf.densecrf as dcrf  # noqa: E402
from pydensecrf.utils import (  # noqa: E402
    create_pairwise_bilateral,
    create_pairwise_gaussian,
    unary_from_labels,
    unary_from_softmax,
)

from wsss_core.data.io import IGNORE_INDEX  # noqa: E402
from wsss_core.refine import affinity as aff  # noqa: E402
from wsss_core.refine import crf as crf_mod  # noqa: E402
from wsss_core.refine.crf import PRESETS, bg_power, crf_cam_probs, crf_params, crf_refine_cams  # noqa: E402

KEYS = np.array([3, 8, 15])          # VOC class ids; the wseg cam dict keys are KEYS - 1
N_VOC = 21


def scene(seed: int = 0, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A small random image (flat rectangles + noise) and three blocky max-normalised CAMs."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float64)
    img[:] = rng.integers(0, 256, 3)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0:y0 + rng.integers(8, 24), x0:x0 + rng.integers(8, 30)] = rng.integers(0, 256, 3)
    img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    cams = rng.random((3, h // 8, w // 8)).astype(np.float32)
    cams = np.kron(cams, np.ones((8, 8), np.float32)) + 0.2 * rng.random((3, h, w)).astype(np.float32)
    return img, (cams / cams.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def cam_dict(cams: np.ndarray) -> dict[int, np.ndarray]:
    return {int(k) - 1: c for k, c in zip(KEYS, cams)}


# ------------------------------------------------------------------ the references, as the scripts run them

def wseg_contrast_infer_crf(img: np.ndarray, cams: dict, bg_score: float = 0.26) -> tuple[np.ndarray, np.ndarray]:
    """usr922/wseg contrast_infer.py::_crf + _crf_inference (t 10, n_labels 21, gt_prob 0.7)."""
    h, w = list(cams.values())[0].shape
    tensor = np.zeros((21, h, w), np.float32)
    for key in cams.keys():
        tensor[key + 1] = cams[key]
    tensor[0, :, :] = bg_score
    predict = np.argmax(tensor, axis=0).astype(np.uint8)
    d = dcrf.DenseCRF2D(w, h, 21)
    d.setUnaryEnergy(unary_from_labels(predict, 21, gt_prob=0.7, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    q = np.array(d.inference(10)).reshape((21, h, w))
    return np.argmax(q, axis=0).astype(np.uint8), q


def wseg_aff_prepare(img: np.ndarray, cams: dict, alpha: float) -> np.ndarray:
    """usr922/wseg aff_prepare.py::_infer_crf_with_alpha + _crf_inference: the saved (21, H, W) Q."""
    h, w = list(cams.values())[0].shape
    tensor = np.zeros((21, h, w), np.float32)
    for key in cams.keys():
        tensor[key + 1] = cams[key]
    tensor[0, :, :] = np.power(1 - np.max(tensor, axis=0, keepdims=True), alpha)
    predict = np.argmax(tensor, axis=0).astype(np.uint8)
    d = dcrf.DenseCRF2D(w, h, 21)
    d.setUnaryEnergy(unary_from_labels(predict, 21, gt_prob=0.7, zero_unsure=False))
    feats = create_pairwise_gaussian(sdims=(3, 3), shape=img.shape[:2])
    d.addPairwiseEnergy(feats, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    feats = create_pairwise_bilateral(sdims=(80, 80), schan=(13, 13, 13), img=img, chdim=2)
    d.addPairwiseEnergy(feats, compat=10, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    return np.array(d.inference(10)).reshape((21, h, w))


def irn_crf_inference_label(img: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """SIPE/IRN crf_inference_label (t 10, gt_prob 0.7): n_labels = bg + the present classes."""
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    q = d.inference(10)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)


# ------------------------------------------------------------------ recording what reaches pydensecrf

class _RecordingCRF:
    def __init__(self, calls, w, h, n):
        self.calls, self.n, self.hw = calls, n, h * w
        calls.append(("DenseCRF2D", w, h, n))

    def setUnaryEnergy(self, u):
        self.calls.append(("unary", np.array(u)))

    def addPairwiseEnergy(self, feats, compat, kernel, normalization):
        self.calls.append(("energy", np.array(feats), compat, kernel, normalization))

    def addPairwiseGaussian(self, sxy, compat):
        self.calls.append(("gaussian", sxy, compat))

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat):
        self.calls.append(("bilateral", sxy, srgb, np.array(rgbim), compat))

    def inference(self, t):
        return np.full((self.n, self.hw), 1.0 / self.n, np.float32)


@pytest.fixture
def recorded(monkeypatch):
    calls: list = []

    class FakeDcrf:
        DIAG_KERNEL, NORMALIZE_SYMMETRIC = dcrf.DIAG_KERNEL, dcrf.NORMALIZE_SYMMETRIC

        @staticmethod
        def DenseCRF2D(w, h, n):
            return _RecordingCRF(calls, w, h, n)

    monkeypatch.setattr(crf_mod, "_import_dcrf", lambda: (FakeDcrf, unary_from_labels, unary_from_softmax))
    return calls


def _one(calls, kind):
    found = [c for c in calls if c[0] == kind]
    assert len(found) == 1, (kind, [c[0] for c in calls])
    return found[0]


@pytest.mark.parametrize("preset", ["seam_label", "psa_aff_label"])
@pytest.mark.parametrize("label_unary", ["all", "present"])
def test_label_unary_equals_unary_from_labels(recorded, preset, label_unary):
    img, cams = scene(0)
    params = crf_params(preset, label_unary=label_unary)
    bg = 0.26 if preset == "seam_label" else bg_power(cams, 4.0)
    crf_cam_probs(img, cams, bg, params, keys=KEYS, n_classes=N_VOC)
    if label_unary == "all":     # wseg: class-space labels over all 21 labels
        tensor = np.zeros((N_VOC, *cams.shape[1:]), np.float32)
        tensor[KEYS] = cams
        tensor[0] = bg
        labels, n = tensor.argmax(0), N_VOC
    else:                        # SIPE/IRN: compact labels over bg + the K present classes
        labels, n = np.concatenate([np.broadcast_to(np.float32(bg), cams.shape[1:])[None], cams]).argmax(0), 4
    assert _one(recorded, "DenseCRF2D")[1:] == (64, 48, n)
    u = _one(recorded, "unary")[1]
    np.testing.assert_array_equal(u, unary_from_labels(labels, n, 0.7, zero_unsure=False))
    off = float(u.max())
    assert off == pytest.approx(-np.log(0.3 / (n - 1)), rel=1e-6)      # 4.20 (all) vs 2.30 (present, K = 3)


def test_psa_aff_label_kernels_are_create_pairwise_and_seam_label_add_pairwise(recorded):
    img, cams = scene(1)
    crf_cam_probs(img, cams, bg_power(cams, 4.0), PRESETS["psa_aff_label"], keys=KEYS, n_classes=N_VOC)
    energies = [c for c in recorded if c[0] == "energy"]
    assert len(energies) == 2 and not [c for c in recorded if c[0] in ("gaussian", "bilateral")]
    (_, g, g_compat, g_kernel, g_norm), (_, b, b_compat, b_kernel, b_norm) = energies
    np.testing.assert_array_equal(g, create_pairwise_gaussian(sdims=(3, 3), shape=img.shape[:2]))
    np.testing.assert_array_equal(b, create_pairwise_bilateral(sdims=(80, 80), schan=(13, 13, 13), img=img, chdim=2))
    assert (g_compat, b_compat) == (3, 10)
    assert g_kernel == b_kernel == dcrf.DIAG_KERNEL and g_norm == b_norm == dcrf.NORMALIZE_SYMMETRIC
    recorded.clear()
    crf_refine_cams(img, cams, KEYS, 0.26, PRESETS["seam_label"], n_classes=N_VOC)
    assert _one(recorded, "gaussian")[1:] == (3, 3)
    _, sxy, srgb, rgb, compat = _one(recorded, "bilateral")
    assert (sxy, srgb, compat) == (50, 5, 10) and np.array_equal(rgb, img)
    assert not [c for c in recorded if c[0] == "energy"]


# ------------------------------------------------------------------ end to end, bit for bit

def test_seam_label_matches_wseg_contrast_infer_crf_bit_for_bit(monkeypatch):
    from wsss_core.stages import refine as refine_stage

    img, cams = scene(0)
    ref, q_ref = wseg_contrast_infer_crf(img, cam_dict(cams))
    out = crf_refine_cams(img, cams, KEYS, 0.26, PRESETS["seam_label"], n_classes=N_VOC)
    np.testing.assert_array_equal(out, ref)
    q = crf_cam_probs(img, cams, 0.26, PRESETS["seam_label"], keys=KEYS, n_classes=N_VOC)
    np.testing.assert_array_equal(q, q_ref[np.concatenate([[0], KEYS])].astype(np.float32))
    # the refine stage's worker passes the dataset's class count

    class Info:
        n_classes = N_VOC

        def image_path(self, image_id):
            return image_id

    monkeypatch.setattr(refine_stage, "_WORKER", {"store": {"a": (KEYS, cams)}, "info": Info(),
                                                  "params": PRESETS["seam_label"], "bg": 0.26})
    monkeypatch.setattr(refine_stage, "read_image", lambda path: img)
    np.testing.assert_array_equal(refine_stage._refine_one("a")[1], ref)
    # the old present-only label space differs from the reference on this image
    old = crf_refine_cams(img, cams, KEYS, 0.26, crf_params("seam_label", label_unary="present"))
    assert (old != ref).any()
    assert (old == ref).mean() < 0.9          # 78.3 % agreement


def test_psa_aff_label_matches_wseg_aff_prepare_bit_for_bit():
    from wsss_core.stages.affinity import AFF_CRF, confident_scores

    img, cams = scene(0)
    channels = np.concatenate([[0], KEYS])
    q_la_ref, q_ha_ref = wseg_aff_prepare(img, cam_dict(cams), 4.0), wseg_aff_prepare(img, cam_dict(cams), 24.0)
    keys, q_la, q_ha = confident_scores(img, KEYS, cams, 4.0, 24.0, AFF_CRF, n_classes=N_VOC)
    assert keys.tolist() == KEYS.tolist()
    np.testing.assert_array_equal(q_la, q_la_ref[channels].astype(np.float32))
    np.testing.assert_array_equal(q_ha, q_ha_ref[channels].astype(np.float32))
    # argmax over the K+1 kept channels = argmax over all 21 (the absent labels never win)
    np.testing.assert_array_equal(channels[q_la.argmax(0)], q_la_ref.argmax(0))
    # the old present-only variant, and the 21-label one with addPairwise* kernels, differ from the reference
    bg = bg_power(cams, 4.0)
    old = crf_cam_probs(img, cams, bg, crf_params("psa_aff_label", label_unary="present", pairwise="add"))
    assert (channels[old.argmax(0)] != q_la_ref.argmax(0)).any()        # 54.3 % label agreement
    add = crf_cam_probs(img, cams, bg, crf_params("psa_aff_label", pairwise="add"), keys=KEYS, n_classes=N_VOC)
    assert not np.array_equal(add, q_la_ref[channels].astype(np.float32))


def test_irn_label_crf_stays_over_the_present_classes():
    from wsss_core.refine import irn

    img, cams = scene(2)
    x = np.concatenate([np.full((1, *cams.shape[1:]), 0.3, np.float32), cams])     # bg map first
    labels = x.argmax(0)
    got = irn.crf_label_refine(img, labels, crf_params("seam_label", label_unary="present"), 4)
    np.testing.assert_array_equal(got, irn_crf_inference_label(img, labels, 4))


# ------------------------------------------------------------------ item 5: affinity labels and walk radius

def test_block_mean_and_nearest_labels_differ_on_a_hand_built_case(monkeypatch, tmp_path):
    """Key 7; la: bg 0.6 everywhere, fg 1.0 only at the corner pixels (0, 0) and (0, 15); ha: bg 0.01, fg the same
    (symmetric under the h-flip). nearest samples pixel (0, 0) of block (0, 0): fg for la and ha -> 7, and pixel
    (0, 8) of block (0, 1): bg for both -> 0. The 8x8 means of the top blocks: la fg 1/64 < 0.6 -> la bg, ha fg
    1/64 > 0.01 -> ha fg -> ignored (255) (wseg/PSA VOC12AffDataset); the bottom blocks are bg for both -> 0."""
    from wsss_core.stages import affinity as stage

    h = w = 16
    s = np.zeros((4, h, w), np.float32)            # [la bg, la fg, ha bg, ha fg]
    s[0], s[2] = 0.6, 0.01
    s[1, 0, 0] = s[1, 0, 15] = s[3, 0, 0] = s[3, 0, 15] = 1.0
    image = np.full((h, w, 3), 100, np.uint8)
    monkeypatch.setattr(stage, "confident_scores", lambda img, keys, cams, la, ha, crf, n: (np.array([7]), s[:2],
                                                                                             s[2:]))
    monkeypatch.setattr(stage, "read_image", lambda path: image)

    class Info:
        n_classes = N_VOC

        def image_path(self, image_id):
            return image_id

    def item(cfg):
        ds = stage.AffinityDataset(Info(), ["a"], [], {"la": 4, "ha": 24, "crop_size": 16, **cfg})
        ds._store = {"a": (np.array([7]), np.zeros((1, h, w), np.float32))}
        return ds[0]["label"].numpy()

    default, nearest = item({}), item({"label_reduce": "nearest"})
    mean = s.reshape(4, 2, 8, 2, 8).mean(axis=(2, 4))                     # block_reduce(..., np.mean), by hand
    assert mean[1, 0, 0] == pytest.approx(1 / 64) and mean[3, 0, 0] == pytest.approx(1 / 64)
    assert default.tolist() == [[IGNORE_INDEX, IGNORE_INDEX], [0, 0]]
    assert nearest.tolist() == [[7, 0], [0, 0]]
    assert item({"label_reduce": "block_mean"}).tolist() == default.tolist()


def test_config_defaults_follow_the_references():
    from wsss_core.config import stage_config

    config = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    for exp in ("ppc", "mctformer"):
        cfg = stage_config(config, "voc", exp, "affinity")
        assert cfg["label_reduce"] == "block_mean"
    ppc = stage_config(config, "voc", "ppc", "affinity")
    assert ppc["crf"]["preset"] == "psa_aff_label" and ppc["shrink_radius"] is True and ppc["radius"] == 5
    assert stage_config(config, "voc", "cam", "crf")["preset"] == "seam_label"
    assert stage_config(config, "voc", "sipe", "irn")["crf"]["preset"] == "seam_label"


def test_walk_radius_shrinks_like_wseg():
    # wseg resnet38_aff.py: radius = (min_edge - 1) // 2 if min_edge < 2 * 5 + 1 else 5
    for (h, w), r in {(7, 12): 3, (8, 100): 3, (100, 7): 3, (9, 40): 4, (10, 10): 4, (11, 11): 5, (56, 56): 5,
                      (4, 4): 1}.items():
        assert aff.walk_radius(h, w, 5) == r, (h, w)
        assert aff.walk_radius(h, w, 5, shrink=False) == 5
    frm, to = aff.pair_indices(4, 4, 1)                     # radius 1: no offsets, no pairs
    assert frm.numel() == 0 and to.numel() == 0


def _hand_walk(feat: np.ndarray, cells: np.ndarray, r: int, beta: float, logt: int) -> np.ndarray:
    """PSA/wseg random walk by hand (float64): the forward pairs of get_indices_of_pairs (from rows 0..h-r, columns
    r-1..w-r; offsets (0, 1..r-1) and dy 1..r-1, |dx| <= r-1, dx^2 + dy^2 < r^2), a_ij = exp(-mean |f_i - f_j|),
    symmetric with 1 on the diagonal, ^beta, column-normalised, squared logt times; cells (C, h, w) @ T."""
    _, h, w = feat.shape
    a = np.eye(h * w)
    for y in range(0, h - r + 1):
        for x in range(r - 1, w - r + 1):
            for dy in range(0, r):
                for dx in range(-(r - 1), r):
                    if (dy == 0 and dx <= 0) or dx * dx + dy * dy >= r * r:
                        continue
                    i, j = y * w + x, (y + dy) * w + (x + dx)
                    a[i, j] = a[j, i] = np.exp(-np.abs(feat[:, y, x] - feat[:, y + dy, x + dx]).mean())
    t = a ** beta
    t = t / t.sum(0, keepdims=True)
    for _ in range(logt):
        t = t @ t
    return (cells.reshape(len(cells), -1) @ t).reshape(cells.shape)


def test_random_walk_radius_shrink_on_a_small_image_against_a_hand_computation():
    """56 x 96 image -> 7 x 12 feature grid (short side 7 < 11): wseg walks with radius 3. A wall of 3 feature
    columns (4..6) with distant features splits the grid, the class is on the left (columns 0..3). At radius 3
    (|dx| <= 2) nothing crosses the wall: the left part keeps the class. At radius 5 (no shrink, PSA) the pairs
    (dy 1..2, dx -4) from column 7 link the left column 3 (rows 1..4) to the right part, where the class is
    diluted below the bg score."""
    from wsss_core.stages.affinity import random_walk_labels

    h, w = 56, 96
    feat = np.zeros((1, 7, 12), np.float32)
    feat[:, :, 4:7] = 1000.0
    model = lambda x: torch.from_numpy(feat)[None]  # noqa: E731
    image = np.zeros((h, w, 3), np.uint8)
    cams = np.zeros((1, h, w), np.float32)
    cams[0, :, :32] = 0.7                           # feature columns 0..3
    bg, beta, logt = 0.25, 8.0, 6
    cells = F.avg_pool2d(torch.from_numpy(np.concatenate([np.full((1, h, w), bg, np.float32), cams]))[None], 8)[0]

    def hand(r):
        rw = _hand_walk(feat.astype(np.float64), cells.numpy().astype(np.float64), r, beta, logt)
        up = F.interpolate(torch.from_numpy(rw)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return np.array([0, 15])[up.argmax(0).numpy()].astype(np.uint8)

    shrunk = random_walk_labels(model, image, np.array([15]), cams, bg, torch.device("cpu"), 5, beta, logt)
    kept = random_walk_labels(model, image, np.array([15]), cams, bg, torch.device("cpu"), 5, beta, logt,
                              shrink_radius=False)
    np.testing.assert_array_equal(shrunk, hand(3))
    np.testing.assert_array_equal(kept, hand(5))
    want = np.zeros((7, 12), np.uint8)                 # labels at the feature cells' centres
    want[:, :4] = 15
    np.testing.assert_array_equal(shrunk[4::8, 4::8], want)
    want[1:5, 3] = 0                                   # radius 5: column 3, rows 1..4 lost the class
    np.testing.assert_array_equal(kept[4::8, 4::8], want)
