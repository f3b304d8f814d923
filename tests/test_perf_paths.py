"""The fast paths of issue 7 (bench/) equal the plain ones: CAM inference (channels-last, batched flips, resizing
after the flip sum, frozen TorchScript) and the threshold curve (per-channel max, arithmetic threshold counts, one
bincount with a dump row for ignored pixels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss_core.data.transforms import normalize, to_tensor
from wsss_core.engine.trainer import _on_cuda
from wsss_core.methods import cam as cam_method
from wsss_core.methods import ppc as ppc_method
from wsss_core.methods.inference import frozen_cam_fn, multiscale_cams
from wsss_core.metrics import ConfusionMatrix, ThresholdCurve, cam_to_labels
from wsss_core.metrics.miou import _count_below, _max_and_index

from conftest import randomize_bn, tiny_cam_classifier

TINY = {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 8, "weights": None}


@pytest.fixture(scope="module")
def cam_model():
    torch.manual_seed(0)
    model = cam_method.build_model({"backbone": TINY}, 4).eval()
    randomize_bn(model, 3)
    return model


def _image(h=45, w=58, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def plain_multiscale(fn, image, scales, flip, classes=None):
    """The straightforward version: one batch-of-one forward per scale and flip (NCHW), every map resized to the
    image on its own, un-flipped after resizing, summed; ReLU; per-map max normalisation."""
    h, w = image.shape[:2]
    total = 0
    with torch.no_grad():
        for s in scales:
            size = (max(1, round(w * s)), max(1, round(h * s)))  # the references' PIL bicubic views
            img = image if s == 1.0 else np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
            for f in ((False, True) if flip else (False,)):
                x = to_tensor(normalize(np.ascontiguousarray(img[:, ::-1]) if f else img)).unsqueeze(0)
                c = F.interpolate(fn(x), size=(h, w), mode="bilinear", align_corners=False)[0]
                total = total + (c.flip(-1) if f else c)
    total = F.relu(total)
    if classes is not None:
        total = total[list(classes)]
    return (total / (total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)).numpy()


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("classes", [None, [2, 0]])
def test_multiscale_cams_equals_the_plain_loop(cam_model, flip, channels_last, classes):
    img = _image()
    fn = lambda x: cam_method.cam_forward(cam_model, x)  # noqa: E731
    scales = [1.0, 0.5, 1.5, 2.0]
    fast = multiscale_cams(fn, img, scales, flip, torch.device("cpu"), classes=classes, channels_last=channels_last)
    plain = plain_multiscale(fn, img, scales, flip, classes)
    assert fast.dtype == np.float32 and fast.shape == plain.shape
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)


def test_frozen_cam_fn_equals_eager_and_is_used_for_the_cam_net(cam_model):
    img = _image(61, 47, seed=1)
    frozen, how = frozen_cam_fn(cam_model, cam_method.cam_forward)
    assert how.startswith("TorchScript"), how
    eager = lambda x: cam_method.cam_forward(cam_model, x)  # noqa: E731
    a = multiscale_cams(eager, img, [1.0, 0.5, 1.5], True, torch.device("cpu"), classes=[1, 3])
    b = multiscale_cams(frozen, img, [1.0, 0.5, 1.5], True, torch.device("cpu"), classes=[1, 3], channels_last=False)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert not cam_model.training  # the model itself is not changed


def test_frozen_cam_fn_falls_back_when_the_trace_depends_on_the_size(cam_model):
    def size_dependent(model, x):  # a Python float from the shape becomes a constant in the trace
        return cam_method.cam_forward(model, x) * float(x.shape[-1])

    fn, how = frozen_cam_fn(cam_model, size_dependent)
    assert how.startswith("eager"), how
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        assert torch.equal(fn(x), size_dependent(cam_model, x))


def test_frozen_cam_fn_falls_back_for_a_model_in_training_mode(cam_model):
    cam_model.train()
    try:
        _, how = frozen_cam_fn(cam_model, cam_method.cam_forward)
    finally:
        cam_model.eval()
    assert how.startswith("eager")


@pytest.mark.parametrize("variant", ["eps", "seam"])
def test_frozen_cam_fn_on_ppc_gives_the_eager_maps(variant):
    """PPC also goes through the default multiscale path in infer_cams: frozen or fallen back, the maps agree."""
    torch.manual_seed(0)
    cfg = {"backbone": {"arch": "resnet38", "width": 0.125, "weights": None}, "ppc": {"variant": variant}}
    model = ppc_method.build_model(cfg, 4).eval()
    img = _image(40, 48, seed=2)
    frozen, how = frozen_cam_fn(model, ppc_method.cam_forward)
    eager = lambda x: ppc_method.cam_forward(model, x)  # noqa: E731
    a = multiscale_cams(eager, img, [1.0, 0.5], True, torch.device("cpu"))
    b = multiscale_cams(frozen, img, [1.0, 0.5], True, torch.device("cpu"), channels_last=how.startswith("eager"))
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ threshold curve

def test_count_below_equals_searchsorted_at_the_edges():
    for dtype in (np.float32, np.float64):
        thr = np.round(np.arange(60) * 0.01, 2).astype(dtype)
        edges = np.concatenate([thr, np.nextafter(thr, dtype(-1)), np.nextafter(thr, dtype(2)),
                                np.array([-1, 0, 0.595, 0.59, 0.6, 1, np.inf, -np.inf], dtype)]).astype(dtype)
        v = np.concatenate([edges, np.random.default_rng(0).random(5000).astype(dtype)]).reshape(2, -1)
        np.testing.assert_array_equal(_count_below(thr, v), np.searchsorted(thr, v, side="left"))
    uneven = np.array([0.0, 0.05, 0.3, 0.31, 0.9], np.float32)  # not evenly spaced: the binary-search fallback
    v = np.random.default_rng(1).random((30, 30)).astype(np.float32)
    np.testing.assert_array_equal(_count_below(uneven, v), np.searchsorted(uneven, v, side="left"))


def test_max_and_index_equals_max_and_first_argmax():
    rng = np.random.default_rng(0)
    cams = rng.integers(0, 4, (5, 20, 30)).astype(np.float32) / 4  # many ties
    v, idx = _max_and_index(cams)
    np.testing.assert_array_equal(v, cams.max(0))
    np.testing.assert_array_equal(idx, cams.argmax(0))
    cams[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _max_and_index(cams)


def _reference_curve(items, thresholds, n):
    out = []
    for t in thresholds:
        cm = ConfusionMatrix(n)
        for gt, cams, keys in items:
            cm.update(gt, cam_to_labels(cams, keys, t))
        out.append((cm.matrix, cm.invalid_pred))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("thresholds", [np.round(np.arange(60) * 0.01, 2), np.array([0.0, 0.1, 0.12, 0.5, 0.7])])
def test_threshold_curve_equals_per_threshold_confusion(dtype, thresholds):
    rng = np.random.default_rng(3)
    n = 6
    items = []
    for i in range(6):
        h, w = 17 + i, 23
        gt = rng.integers(0, n, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        k = 1 + i % 3
        keys = np.sort(rng.choice(np.arange(1, n), size=k, replace=False))
        if i == 4:
            keys = np.concatenate([[0], keys[:-1]]) if k > 1 else np.array([0])  # a bg map first
        if i == 5:
            keys = np.zeros(0, np.int64)  # no foreground map: all background
        cams = rng.random((len(keys), h, w)).astype(dtype)
        cams[:, :3] = np.asarray(thresholds, dtype)[rng.integers(0, len(thresholds), (len(keys), 3, w))]  # ties
        items.append((gt, cams, keys))
    curve = ThresholdCurve(n, thresholds)
    for gt, cams, keys in items:
        curve.update(gt, cams, keys)
    for j, (m, inv) in enumerate(_reference_curve(items, thresholds, n)):
        np.testing.assert_array_equal(curve.confusion_at(j), m)
        np.testing.assert_array_equal(curve._full_at(j)[:, n], inv)


def test_threshold_curve_fast_path_keeps_the_input_checks():
    curve = ThresholdCurve(3)
    cams = np.full((1, 4, 4), 0.5, np.float32)
    with pytest.raises(ValueError, match="outside 0..2"):
        curve.update(np.full((4, 4), 7, np.uint8), cams, np.array([1]))
    with pytest.raises(ValueError, match="NaN"):
        curve.update(np.zeros((4, 4), np.uint8), np.full((1, 4, 4), np.nan, np.float32), np.array([1]))
    curve.update(np.full((4, 4), 255, np.uint8), cams, np.array([1]))  # all ignored: nothing counted
    assert curve._counts.sum() == 0
    curve.update(np.zeros((4, 4), np.uint8), cams, np.array([5]))  # key beyond n_classes: the invalid column
    assert curve._full_at(0)[0, 3] == 16


def test_pinned_batches_only_for_cuda_models():
    assert not _on_cuda(torch.nn.Linear(2, 2))
    assert not _on_cuda(torch.nn.ReLU())  # no parameters


def test_infer_cams_stage_frozen_path_equals_the_eager_path(tmp_path):
    """stages.classifier.infer_cams on the CPU (frozen TorchScript, the default) writes the maps of the eager
    channels-last path (``cams.optimize: false``) within 1e-4, and logs which path it used."""
    from wsss_core.stages.classifier import infer_cams, train_classifier
    from wsss_core.stages.job import Files, JobSettings
    from wsss_core.store import ShardedStore

    prepared, cfg = tiny_cam_classifier(tmp_path)
    model = str(tmp_path / "model.pt")
    job = JobSettings(prepared=prepared, splits={"train": "train_aug"}, method="cam", cfg=cfg, device="cpu",
                      log=str(tmp_path / "train.log"))
    train_classifier(job, Files(saliency=[]), Files(model=model))
    cams_cfg = {"scales": [1.0, 0.5, 1.5], "flip": True}
    for name, extra in (("frozen", {}), ("eager", {"optimize": False})):
        job = JobSettings(prepared=prepared, cfg={**cams_cfg, **extra}, device="cpu", log=str(tmp_path / f"{name}.log"),
                          wildcards={"split": "train", "shard": 0, "nshards": 1})
        infer_cams(job, Files(model=model), Files(cams=str(tmp_path / f"{name}.h5")))
    assert "CAM inference: TorchScript" in (tmp_path / "frozen.log").read_text()
    assert "CAM inference" not in (tmp_path / "eager.log").read_text()
    with ShardedStore([tmp_path / "frozen.h5"]) as a, ShardedStore([tmp_path / "eager.h5"]) as b:
        assert a.ids() == b.ids() and len(a) == 4
        for i in a.ids():
            (ka, ca), (kb, cb) = a[i], b[i]
            np.testing.assert_array_equal(ka, kb)
            np.testing.assert_allclose(ca, cb, atol=1e-3)  # float16 storage: 1 ulp at 1.0 is 9.8e-4


@pytest.mark.slow
def test_compiled_cam_fn_equals_eager(cam_model):
    """cams.optimize: compile (torch.compile with dynamic shapes): one compilation serves other sizes and scales, and
    the maps equal the eager ones within 1e-4 (or, where compiling is impossible, the eager function comes back)."""
    from wsss_core.methods.inference import compiled_cam_fn

    fn, how = compiled_cam_fn(cam_model, cam_method.cam_forward)
    img = _image(50, 61, seed=4)
    eager = lambda x: cam_method.cam_forward(cam_model, x)  # noqa: E731
    a = multiscale_cams(eager, img, [1.0, 0.5, 1.5], True, torch.device("cpu"), classes=[0, 2])
    b = multiscale_cams(fn, img, [1.0, 0.5, 1.5], True, torch.device("cpu"), classes=[0, 2], channels_last=False)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert how.startswith("torch.compile") or how.startswith("eager (torch.compile failed")
