"""Tests of the procedural toy VOC dataset (wsss_core.data.toy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsss_core.data import toy
from wsss_core.data.io import IGNORE_INDEX, read_image, read_label_png
from wsss_core.data.toy import TOY_CLASSES, make_toy_dataset, render_sample

SMALL = dict(image_size=64, n_train_aug=10, n_train=4, n_val=6)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lists(root: Path) -> dict[str, list[str]]:
    d = root / "ImageSets" / "Segmentation"
    return {s: (d / f"{s}.txt").read_text().splitlines() for s in ("train_aug", "train", "val")}


def _windows(a: np.ndarray, r: int) -> np.ndarray:
    """(H, W, (2r+1)**2) neighbourhoods of a 2-D array (edges padded with -1)."""
    p = np.pad(a.astype(np.int32), r, constant_values=-1)
    return np.lib.stride_tricks.sliding_window_view(p, (2 * r + 1, 2 * r + 1)).reshape(*a.shape, -1)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("toy") / "voc"
    return root, make_toy_dataset(root, seed=7, **SMALL)


# ------------------------------------------------------------------------------------------- determinism

def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path, small_ds):
    root_a, _ = small_ds
    root_b = tmp_path / "b"
    make_toy_dataset(root_b, seed=7, **SMALL)
    fa, fb = _files(root_a), _files(root_b)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []

    root_c = tmp_path / "c"
    make_toy_dataset(root_c, seed=8, **SMALL)
    fc = _files(root_c)
    jpgs = [k for k in fa if k.endswith(".jpg")]
    assert len(jpgs) == SMALL["n_train_aug"] + SMALL["n_val"]
    assert all(fa[k] != fc[k] for k in jpgs)


def test_files_match_the_pure_renderer(small_ds):
    """Image i is render_sample with child seed i of SeedSequence(seed): mask exact, image up to JPEG noise."""
    root, _ = small_ds
    n = SMALL["n_train_aug"] + SMALL["n_val"]
    children = np.random.SeedSequence(7).spawn(n)
    for i in (0, n - 1):
        img, mask, _ = render_sample(np.random.default_rng(children[i]), SMALL["image_size"])
        np.testing.assert_array_equal(read_label_png(root / "SegmentationClass" / f"toy_{i:06d}.png"), mask)
        jpg = read_image(root / "JPEGImages" / f"toy_{i:06d}.jpg").astype(np.float32)
        assert np.abs(jpg - img).mean() < 8.0


# ------------------------------------------------------------------------------------------- layout

def test_layout_lists_and_files(small_ds):
    root, summary = small_ds
    lists = _lists(root)
    for s, ids in lists.items():
        assert ids == sorted(ids) and len(set(ids)) == len(ids), s
    assert len(lists["train_aug"]) == SMALL["n_train_aug"]
    assert len(lists["train"]) == SMALL["n_train"]
    assert len(lists["val"]) == SMALL["n_val"]
    assert set(lists["train"]) <= set(lists["train_aug"])
    assert lists["train"] == lists["train_aug"][: SMALL["n_train"]]
    assert not set(lists["val"]) & set(lists["train_aug"])
    assert lists["train_aug"][0] == "toy_000000"

    assert (root / "classes.txt").read_text().splitlines() == list(TOY_CLASSES)
    assert TOY_CLASSES[0] == "background" and len(TOY_CLASSES) == 6
    meta = json.loads((root / "toy_dataset.json").read_text())
    assert "synthetic" in meta["note"].lower()
    assert meta["params"]["seed"] == 7 and meta["params"]["image_size"] == SMALL["image_size"]
    assert not (root / "Parts").exists()

    n_cls = len(TOY_CLASSES) - 1
    counts = {s: np.zeros(n_cls + 1, int) for s in lists}
    for s, ids in lists.items():
        for img_id in ids:
            img = read_image(root / "JPEGImages" / f"{img_id}.jpg")
            mask = read_label_png(root / "SegmentationClass" / f"{img_id}.png", n_cls + 1)
            assert img.shape == (SMALL["image_size"], SMALL["image_size"], 3)
            assert mask.shape == img.shape[:2]
            labels = np.unique(mask[mask != IGNORE_INDEX])
            assert labels.max() <= n_cls
            assert (labels > 0).any(), f"{img_id} has no object"
            assert (mask == 0).any(), f"{img_id} has no background"
            counts[s][labels] += 1
    for s in lists:
        assert summary["splits"][s] == len(lists[s])
        assert summary["class_image_counts"][s] == {TOY_CLASSES[c]: int(counts[s][c]) for c in range(1, n_cls + 1)}


def test_void_band_separates_every_label_change(small_ds):
    """border=1: no two 4-adjacent non-void pixels differ, and 255 forms thin bands hugging objects."""
    root, _ = small_ds
    n_void = n_near_obj = 0
    for img_id in _lists(root)["train_aug"]:
        m = read_label_png(root / "SegmentationClass" / f"{img_id}.png").astype(np.int32)
        for a, b in ((m[1:, :], m[:-1, :]), (m[:, 1:], m[:, :-1])):
            valid = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
            assert not (valid & (a != b)).any(), f"{img_id}: labels meet without a void band"
        void = m == IGNORE_INDEX
        win = _windows(m, 3)
        thin = ((win >= 0) & (win != IGNORE_INDEX)).any(-1)
        assert thin[void].all(), f"{img_id}: a 255 region thicker than the band"
        win = _windows(m, 2)
        near_obj = ((win > 0) & (win != IGNORE_INDEX)).any(-1)
        n_void += int(void.sum())
        n_near_obj += int(near_obj[void].sum())
    assert n_void > 0
    # Only where an object is thinner than the band (occluded slivers) may no object pixel remain nearby.
    assert n_near_obj / n_void > 0.97, n_near_obj / n_void


@pytest.mark.parametrize("border", [0, 1, 2])
def test_void_band_is_exactly_the_instance_boundary(border):
    for s in range(12):
        _, mask, _, inst = render_sample(np.random.default_rng(s), 64, border=border, return_instances=True)
        win = _windows(inst, border)
        win = np.where(win < 0, inst[..., None], win)  # image edge is not a boundary
        expected = (win != inst[..., None]).any(-1)
        np.testing.assert_array_equal(mask == IGNORE_INDEX, expected)
        # Outside the band the mask is the class of the instance (0 for background).
        assert ((inst == 0) == (mask == 0))[~expected].all()


# ------------------------------------------------------------------------------------------- the WSSS property

@pytest.fixture(scope="module")
def samples():
    rngs = [np.random.default_rng(c) for c in np.random.SeedSequence(123).spawn(200)]
    return [render_sample(r, 64) for r in rngs]


def test_parts_are_a_small_minority_of_object_pixels(samples):
    part_px = obj_px = 0
    for img, mask, part in samples:
        obj = (mask > 0) & (mask != IGNORE_INDEX)
        assert part.any(), "every image shows at least one class part"
        assert not (part & (mask == 0)).any(), "part pixels are object pixels"
        part_px += int((part & obj).sum())
        obj_px += int(obj.sum())
    frac = part_px / obj_px
    assert 0.06 <= frac <= 0.25, frac


def test_body_is_class_agnostic_and_part_is_class_specific(samples):
    n_cls = len(TOY_CLASSES) - 1
    body_sum = np.zeros((n_cls + 1, 3))
    body_n = np.zeros(n_cls + 1)
    part_sum = np.zeros((n_cls + 1, 3))
    part_n = np.zeros(n_cls + 1)
    bg = []
    for img, mask, part in samples:
        x = img.astype(np.float64)
        for c in np.unique(mask):
            if c == 0 or c == IGNORE_INDEX:
                continue
            b = (mask == c) & ~part
            p = (mask == c) & part
            body_sum[c] += x[b].sum(0)
            body_n[c] += b.sum()
            part_sum[c] += x[p].sum(0)
            part_n[c] += p.sum()
        bg.append(x[mask == 0])
    assert (body_n[1:] > 0).all() and (part_n[1:] > 0).all()
    body_mean = body_sum[1:] / body_n[1:, None]
    part_mean = part_sum[1:] / part_n[1:, None]

    def pairwise(m):
        d = np.linalg.norm(m[:, None] - m[None], axis=-1)
        return d[np.triu_indices(len(m), 1)]

    body_spread, part_spread = pairwise(body_mean).max(), pairwise(part_mean).min()
    assert body_spread < 20.0, body_mean  # bodies look the same whatever the class (sampling noise only)
    assert part_spread > 60.0, part_mean  # parts tell the classes apart ...
    assert part_spread > 4 * body_spread  # ... far more than bodies do
    # Bodies are distinguishable from the background (so expansion methods have an edge to find).
    bg_mean = np.concatenate(bg).mean(0)
    assert np.linalg.norm(body_mean.mean(0) - bg_mean) > 30.0
    assert body_mean[:, 2].mean() > bg_mean[2] + 15  # cool (blue) bodies vs. warm background


def _vivid(px: np.ndarray) -> np.ndarray:
    """Bool per pixel of (N, 3) uint8 RGB: HSV saturation > 0.7 and value > 0.5 (the class-part look)."""
    x = px.astype(np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    return ((mx - mn) / np.maximum(mx, 1e-6) > 0.7) & (mx > 0.5)


def test_background_clutter_avoids_class_part_colours(samples):
    """Class parts are vivid (saturated, bright); background clutter and bodies practically never are."""
    n_cls = len(TOY_CLASSES) - 1
    for c in range(1, n_cls + 1):
        px = np.concatenate([img[(mask == c) & part] for img, mask, part in samples])
        assert _vivid(px).mean() > 0.3, TOY_CLASSES[c]
    bg = np.concatenate([img[mask == 0] for img, mask, _ in samples])
    assert _vivid(bg).mean() < 1e-3
    body = np.concatenate([img[(mask > 0) & (mask != IGNORE_INDEX) & ~part] for img, mask, part in samples])
    assert _vivid(body).mean() < 1e-2


def test_body_size_does_not_depend_on_class(samples):
    n_cls = len(TOY_CLASSES) - 1
    areas = {c: [] for c in range(1, n_cls + 1)}
    for _, mask, part in samples:
        for c in np.unique(mask):
            if 0 < c < IGNORE_INDEX:
                areas[int(c)].append(int(((mask == c) & ~part).sum()))
    means = np.array([np.mean(areas[c]) for c in areas])
    assert means.max() / means.min() < 1.5, means


def test_debug_parts_written_on_request(tmp_path):
    root = tmp_path / "d"
    make_toy_dataset(root, seed=1, image_size=48, n_train_aug=3, n_train=1, n_val=1, debug_parts=True)
    for i in range(4):
        parts = read_label_png(root / "Parts" / f"toy_{i:06d}.png", 2)
        mask = read_label_png(root / "SegmentationClass" / f"toy_{i:06d}.png")
        assert parts.any() and not (parts.astype(bool) & (mask == 0)).any()


# ------------------------------------------------------------------------------------------- atomicity

def _failing_writer(monkeypatch, after: int):
    real = toy.write_image
    calls = {"n": 0}

    def writer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "write_image", writer)
    return calls


def test_crash_midway_leaves_no_root(tmp_path, monkeypatch):
    calls = _failing_writer(monkeypatch, after=3)
    root = tmp_path / "voc"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_toy_dataset(root, seed=0, **SMALL)
    assert calls["n"] == 4
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder was cleaned up too


def test_crash_keeps_previous_root_and_success_replaces_it(tmp_path, monkeypatch):
    root = tmp_path / "voc"
    make_toy_dataset(root, seed=0, **SMALL)
    before = _files(root)
    _failing_writer(monkeypatch, after=2)
    with pytest.raises(RuntimeError):
        make_toy_dataset(root, seed=1, **SMALL)
    assert _files(root) == before
    monkeypatch.undo()

    stale = tmp_path / f"voc.tmp-{__import__('os').getpid()}"
    (stale / "JPEGImages").mkdir(parents=True)
    (stale / "JPEGImages" / "junk.jpg").write_bytes(b"junk")
    make_toy_dataset(root, seed=1, image_size=48, n_train_aug=3, n_train=1, n_val=1)
    after = _files(root)
    assert len([k for k in after if k.endswith(".jpg")]) == 4
    assert json.loads((root / "toy_dataset.json").read_text())["params"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_toy_dataset(tmp_path / "x", n_train_aug=5, n_train=6)
    with pytest.raises(ValueError):
        make_toy_dataset(tmp_path / "x", n_classes=len(TOY_CLASSES))
    assert not (tmp_path / "x").exists()
