"""Import / export of CAMs and pseudo-masks in the reference repositories' per-image layouts (real files, toy data).

The CAM curves of imported folders are checked against an independent numpy computation of the same curve (argmax
over [t-plane, label-class maps] or, with a background map, keys[argmax]; a confusion matrix over the GT with 255
ignored; the mean IoU over the classes with GT or prediction), not against the library's metric code.
"""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pytest
from conftest import tiny_cam_classifier
from PIL import Image

from wsss_core.data.io import image_size, write_image
from wsss_core.data.prepare import DatasetInfo
from wsss_core.errors import ConfigError, DataError
from wsss_core.stages.evaluate import cam_scores
from wsss_core.stages.exchange import export_run, import_cams, import_masks
from wsss_core.stages.job import STAGE_FUNCTIONS, Files, JobSettings, stage_function
from wsss_core.store import exchange as ex
from wsss_core.store.shards import ShardedStore, ShardWriter, shard_ids

#: a coarse grid keeps the oracle fast: 0.00, 0.05, ..., 0.55
EVAL = {"thresholds": {"start": 0.0, "stop": 0.6, "step": 0.05}, "mean": "present"}
SPLITS = {"train": 2, "val": 1}  # split -> number of shards


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The prepared tiny toy dataset of the other stage tests (8 + 4 + 4 images of 48 px, 3 classes)."""
    prepared, _ = tiny_cam_classifier(tmp_path_factory.mktemp("exchange"))
    return prepared, DatasetInfo(prepared)


def gt_of(info: DatasetInfo, image_id: str) -> np.ndarray:
    with Image.open(info.mask_path(image_id)) as im:
        return np.array(im)


def cam_like(info: DatasetInfo, image_id: str, keys, rng) -> np.ndarray:
    """float32 (K, H, W) in [0, 1], exactly representable in float16: blurred GT masks of the classes of ``keys``
    (key 0: the background) plus noise."""
    gt = gt_of(info, image_id)
    maps = [cv2.GaussianBlur((gt == k).astype(np.float32) * 0.7, (5, 5), 0) for k in keys]
    maps = np.stack(maps) if maps else np.zeros((0, *gt.shape), np.float32)
    maps += rng.uniform(0, 0.25, maps.shape).astype(np.float32)
    return np.clip(maps, 0, 1).astype(np.float16).astype(np.float32)


def job_for(prepared, cfg, split=None, shard=0, n_shards=1, **kw) -> JobSettings:
    wildcards = {"shard": str(shard), "nshards": str(n_shards)}
    if split:
        wildcards["split"] = split
    return JobSettings(prepared=prepared, dataset="toy", experiment="exp", cfg=cfg, config_hash="h" * 8,
                       splits={"train": "train_aug", "threshold": "train", "eval": "val"}, wildcards=wildcards, **kw)


def write_cam_shards(tmp, info, bg: bool, aux: bool, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in SPLITS.items():
        for k in range(n):
            path = tmp / "cams" / split / f"{k}-of-{n}.h5"
            with ShardWriter(path, "cams", {"split": split, "shard": k, "n_shards": n, "config_hash": "x",
                                            "classes": info.classes}) as w:
                for i in shard_ids(info.ids(split), k, n):
                    keys = ([0] if bg else []) + list(info.labels(i))
                    w.add_cams(i, keys, cam_like(info, i, keys, rng), cam_like(info, i, keys, rng) if aux else None)
            paths.append(str(path))
    return paths


def write_mask_shards(tmp, info, n=2) -> list[str]:
    rng = np.random.default_rng(5)
    paths = []
    for k in range(n):
        path = tmp / "masks" / f"{k}-of-{n}.h5"
        with ShardWriter(path, "masks", {"split": "train_aug", "shard": k, "n_shards": n, "config_hash": "x"}) as w:
            for i in shard_ids(info.ids("train_aug"), k, n):
                vals = np.array([0, *info.labels(i), 255], np.uint8)
                w.add_mask(i, vals[rng.integers(0, len(vals), gt_of(info, i).shape)])
        paths.append(str(path))
    return paths


def import_split_cams(tmp, prepared, cfg, name) -> list[str]:
    """import_cams for every shard of SPLITS; the shard paths."""
    out = []
    for split, n in SPLITS.items():
        for k in range(n):
            path = tmp / name / split / f"{k}-of-{n}.h5"
            import_cams(job_for(prepared, cfg, split, k, n), Files(), Files(cams=str(path)))
            out.append(str(path))
    return out


def raw_cams(paths):
    """{id: (keys, cams float16, aux float16 | None)} exactly as stored."""
    out = {}
    for p in paths:
        with h5py.File(p) as fh:
            for i, g in fh.items():
                out[i] = (g["keys"][()], g["cams"][()], g["aux"][()] if "aux" in g else None)
    return out


def test_stage_functions_are_registered():
    for name, fn in (("import_cams", import_cams), ("import_masks", import_masks), ("export", export_run)):
        assert STAGE_FUNCTIONS[name].startswith("exchange:") and stage_function(name) is fn


@pytest.mark.parametrize("bg, aux, cam_format, expect", [(False, False, "auto", "psa"), (False, False, "irn", "irn"),
                                                         (True, True, "auto", "sipe")])
def test_export_import_round_trip_is_bit_identical(toy, tmp_path, bg, aux, cam_format, expect):
    prepared, info = toy
    cam_paths = write_cam_shards(tmp_path, info, bg, aux)
    mask_paths = write_mask_shards(tmp_path, info)
    (tmp_path / "cam_eval.json").write_text(json.dumps({"threshold": {"value": 0.25, "own_bg": bg}}))
    (tmp_path / ".export.tmp-stale").mkdir()  # a killed job's temp folder
    extra = {"provenance": {"git": "abc"}, "config_hashes": {"cams": "x"}}
    job = job_for(prepared, {"cam_format": cam_format}, extra=extra)
    manifest = export_run(job, Files(cams=cam_paths, masks=mask_paths, cam_eval=str(tmp_path / "cam_eval.json")),
                          Files(dir=str(tmp_path / "export")))
    assert not (tmp_path / ".export.tmp-stale").exists() and not list(tmp_path.glob(".export.tmp-*"))
    on_disk = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["cams"]["format"] == expect and expect in manifest["cams"]["reference"].lower()
    assert manifest["provenance"] == extra["provenance"] and manifest["config_hashes"] == extra["config_hashes"]
    assert manifest["threshold"] == {"value": 0.25, "own_bg": bg} and manifest["classes"] == info.classes
    assert manifest["config_hash"] == "h" * 8 and manifest["dataset"] == "toy" and manifest["experiment"] == "exp"
    assert manifest["cams"]["splits"]["val"] == {"n_images": 4, "ids": info.ids("val")}
    assert manifest["cams"]["n_images"] == 8  # train's 4 + val's 4
    assert manifest["pseudo_masks"]["splits"]["train_aug"]["n_images"] == 8
    assert sorted(p.stem for p in (tmp_path / "export" / "cams").iterdir()) == sorted(info.ids("train")
                                                                                    + info.ids("val"))
    # the files are what the reference code reads
    one = np.load(tmp_path / "export" / "cams" / f"{info.ids('val')[0]}.npy", allow_pickle=True).item()
    if expect == "psa":
        assert sorted(one) == [c - 1 for c in info.labels(info.ids("val")[0])]
    elif expect == "irn":
        assert one["high_res"].dtype == np.float32 and one["keys"].dtype == np.int64
        assert type(one["cam"]).__name__ == "Tensor" and tuple(one["cam"].shape[1:]) == (12, 12)
    else:
        assert one["keys"][0] == 0 and "IS_CAM1" in one

    original = raw_cams(cam_paths)
    for cfg in (manifest["import"]["cams"], {"dir": manifest["import"]["cams"]["dir"], "format": expect}):
        back = raw_cams(import_split_cams(tmp_path, prepared, cfg, f"back-{len(cfg)}"))
        assert back.keys() == original.keys()
        for i, (keys, cams, a) in original.items():
            np.testing.assert_array_equal(back[i][0], keys)
            assert back[i][1].dtype == np.float16 and back[i][1].tobytes() == cams.tobytes()  # bit-identical
            assert (back[i][2] is None) == (a is None) and (a is None or back[i][2].tobytes() == a.tobytes())
    with h5py.File(tmp_path / "back-2" / "val" / "0-of-1.h5") as fh:
        assert fh.attrs["method"] == "imported" and fh.attrs["format"] == expect
        assert fh.attrs["imported_from"] == manifest["import"]["cams"]["dir"] and fh.attrs["config_hash"] == "h" * 8

    masks_back = []
    for k in range(2):
        path = tmp_path / "masks-back" / f"{k}-of-2.h5"
        import_masks(job_for(prepared, manifest["import"]["pseudo_masks"], shard=k, n_shards=2), Files(),
                     Files(masks=str(path)))
        masks_back.append(str(path))
    with ShardedStore(mask_paths) as a, ShardedStore(masks_back, kind="masks") as b:
        assert a.ids() == b.ids() == info.ids("train_aug")
        for i in a.ids():
            np.testing.assert_array_equal(a[i], b[i])
        assert b.attrs["imported_from"] == manifest["import"]["pseudo_masks"]["dir"]


def test_export_refuses_a_format_that_cannot_hold_the_maps(toy, tmp_path):
    prepared, info = toy
    cam_paths = write_cam_shards(tmp_path, info, bg=True, aux=False)
    for fmt in ("psa", "irn"):
        with pytest.raises(ConfigError, match="cannot hold a background map"):
            export_run(job_for(prepared, {"cam_format": fmt}), Files(cams=cam_paths), Files(dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))  # nothing that looks complete
    fg_paths = write_cam_shards(tmp_path / "fg", info, bg=False, aux=False)
    with pytest.raises(ConfigError, match="needs a background map"):
        export_run(job_for(prepared, {"cam_format": "sipe"}), Files(cams=fg_paths), Files(dir=str(tmp_path / "x")))


# --------------------------------------------------------------------------------------------- curves vs an oracle

def oracle_miou(info, split, maps_of, thresholds, own_bg=False) -> list[float]:
    """Present-class mIoU per threshold, computed here with plain numpy."""
    n = info.n_classes
    confs = np.zeros((len(thresholds), n, n), np.int64)
    for image_id in info.ids(split):
        keys, maps = maps_of[image_id]
        gt = gt_of(info, image_id).astype(np.int64)
        valid = gt != 255
        for j, t in enumerate(thresholds):
            if own_bg:
                pred = np.asarray(keys)[maps.argmax(0)]
            else:
                scores = np.concatenate([np.full((1, *gt.shape), t, np.float32), maps])
                pred = np.asarray([0, *keys])[scores.argmax(0)]  # a tie goes to the background plane
            confs[j] += np.bincount(gt[valid] * n + pred[valid], minlength=n * n).reshape(n, n)
    out = []
    for conf in confs:
        tp = np.diag(conf).astype(np.float64)
        union = conf.sum(0) + conf.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(float(np.nanmean(np.where(union > 0, tp / union, np.nan))))
    return out


def write_reference_folder(info, folder, fmt, seed=1) -> dict:
    """Files of ``fmt`` for the ids of SPLITS as the reference code writes them; the maps the evaluation should see
    per id: (keys of the label classes, maps float32)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    seen = {}
    for split in SPLITS:
        for i in info.ids(split):
            labels = sorted(info.labels(i))
            if fmt == "psa":  # the label classes and one more (RTC writes all classes): only the labels are kept
                extra = [c for c in range(1, info.n_classes) if c not in labels][:1]
                keys = sorted(labels + extra)
                maps = cam_like(info, i, keys, rng)
                np.save(folder / f"{i}.npy", {k - 1: m for k, m in zip(keys, maps)})
                seen[i] = (labels, maps[[keys.index(c) for c in labels]])
            elif fmt == "irn":  # "keys" and the strided "cam" are torch tensors upstream; only "high_res" is read
                import torch

                maps = cam_like(info, i, labels, rng)
                np.save(folder / f"{i}.npy", {"keys": torch.tensor(labels) - 1,
                                              "cam": torch.from_numpy(maps[:, ::4, ::4]), "high_res": maps})
                seen[i] = (labels, maps)
            elif fmt == "sipe":
                keys = [0, *labels]
                maps = cam_like(info, i, keys, rng)
                np.save(folder / f"{i}.npy", {"keys": np.asarray(keys, np.int64), "IS_CAM": maps})
                seen[i] = (keys, maps)
            elif fmt == "dense":  # channel 0 a background map (dropped: bg threshold), absent classes zero
                dense = np.zeros((info.n_classes, *gt_of(info, i).shape), np.float32)
                dense[[0, *labels]] = cam_like(info, i, [0, *labels], rng)
                np.save(folder / f"{i}.npy", dense[None] if len(seen) % 2 else dense)  # (1, C, H, W) too
                seen[i] = (labels, dense[labels])
    return seen


@pytest.mark.parametrize("fmt", ["psa", "irn", "sipe", "dense"])
def test_imported_folder_scores_equal_an_independent_curve(toy, tmp_path, fmt):
    prepared, info = toy
    seen = write_reference_folder(info, tmp_path / fmt, fmt)
    shards = import_split_cams(tmp_path, prepared, {"dir": str(tmp_path / fmt), "format": fmt}, "imported")
    res = cam_scores(prepared, shards, "train", "val", EVAL, str(tmp_path / "eval.json"))
    own_bg = fmt == "sipe"
    assert res["threshold"]["own_bg"] is own_bg
    thresholds = [0.0] if own_bg else list(np.round(np.arange(12) * 0.05, 6))
    for split in SPLITS:
        curve = res["curves"][split]
        assert curve["thresholds"] == pytest.approx(thresholds)
        assert curve["miou"] == pytest.approx(oracle_miou(info, split, seen, thresholds, own_bg), rel=1e-12)
    if not own_bg:
        assert 0.05 < res["threshold"]["value"] < 0.55  # the maps are blurred masks over noise up to 0.25


def test_classes_all_keeps_every_map_of_the_file(toy, tmp_path):
    _, info = toy
    i = info.ids("val")[0]
    size = image_size(info.image_path(i))
    dense = np.zeros((info.n_classes, *size), np.float32)
    dense[0], dense[2] = 0.5, 0.25
    np.save(tmp_path / "d.npy", dense)
    c = ex.read_reference_cams(tmp_path / "d.npy", "dense", info.n_classes, size, classes="all")
    assert c.keys.tolist() == [2] and c.cams.shape == (1, *size)
    c = ex.read_reference_cams(tmp_path / "d.npy", "dense", info.n_classes, size, classes="all", bg="own")
    assert c.keys.tolist() == [0, 2] and np.all(c.cams[0] == 0.5)
    np.save(tmp_path / "p.npy", {2: dense[2], 0: dense[0]})
    c = ex.read_reference_cams(tmp_path / "p.npy", "psa", info.n_classes, size, classes="all")
    assert c.keys.tolist() == [1, 3] and np.all(c.cams[1] == 0.25)


# --------------------------------------------------------------------------------------------- errors

def _bad_psa(info, folder, i, what):
    d = np.load(folder / f"{i}.npy", allow_pickle=True).item()
    k = info.labels(i)[0] - 1  # the map of a label class (the others are not imported)
    if what == "shape":
        d = {c: m[:40] for c, m in d.items()}
    elif what == "nan":
        d[k] = d[k].copy()
        d[k][3, 4] = np.nan
    elif what == "range":
        d[k] = d[k].copy()
        d[k][3, 4] = 1.5
    elif what == "label":
        del d[k]
    np.save(folder / f"{i}.npy", d)


@pytest.mark.parametrize("what, fmt, match", [
    ("shape", "psa", r"maps of shape \(40, 48\).*expected the image's \(48, 48\)"),
    ("nan", "psa", "non-finite values"),
    ("range", "psa", r"values in \[.*1\.5\]; expected values in \[0, 1\]"),
    ("label", "psa", "has no map of class"),
    ("missing", "psa", "does not exist"),
    ("dict", "dense", "holds a pickled dict.*expects a float array"),
    ("array", "psa", "holds an array.*expects a pickled dict"),
    ("channels", "dense", r"shape \(3, 48, 48\); expected \(4, H, W\)"),
    ("key", "irn", r"'keys' \[7\] are out of range; expected 0-based foreground class indices in 0\.\.2"),
    ("truncated", "psa", "cannot be read as .npy"),
])
def test_bad_files_raise_a_data_error_naming_the_file(toy, tmp_path, what, fmt, match):
    prepared, info = toy
    folder = tmp_path / "ref"
    write_reference_folder(info, folder, fmt)
    i = info.ids("val")[2]
    path = folder / f"{i}.npy"
    if what in ("shape", "nan", "range", "label"):
        _bad_psa(info, folder, i, what)
    elif what == "missing":
        path.unlink()
    elif what == "dict":
        np.save(path, {"cam": np.zeros((4, 48, 48), np.float32)})
    elif what == "array":
        np.save(path, np.zeros((4, 48, 48), np.float32))
    elif what == "channels":
        np.save(path, np.zeros((3, 48, 48), np.float32))
    elif what == "key":
        np.save(path, {"keys": np.array([7]), "cam": None, "high_res": np.zeros((1, 48, 48), np.float32)})
    elif what == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=match) as exc:
        import_cams(job_for(prepared, {"dir": str(folder), "format": fmt}, "val"), Files(),
                    Files(cams=str(tmp_path / "out" / "0-of-1.h5")))
    assert str(path) in str(exc.value)
    if what == "missing":
        assert repr(i) in str(exc.value) and "'val'" in str(exc.value)
    assert not (tmp_path / "out" / "0-of-1.h5").exists()


def test_bad_pseudo_masks_raise_a_data_error_naming_the_file(toy, tmp_path):
    prepared, info = toy
    folder = tmp_path / "pm"
    ids = info.ids("train_aug")
    for i in ids:
        ex.write_reference_mask(folder / f"{i}.png", gt_of(info, i))
    job = job_for(prepared, {"dir": str(folder), "format": "png"})
    bad = folder / f"{ids[1]}.png"
    Image.fromarray(np.full((48, 48), 9, np.uint8), mode="L").save(bad)  # grayscale, a value out of range
    with pytest.raises(DataError, match="outside 0..3 and 255") as exc:
        import_masks(job, Files(), Files(masks=str(tmp_path / "m.h5")))
    assert str(bad) in str(exc.value)
    Image.fromarray(np.zeros((40, 48), np.uint8), mode="L").save(bad)
    with pytest.raises(DataError, match=r"shape \(40, 48\).*expected the image's \(48, 48\)") as exc:
        import_masks(job, Files(), Files(masks=str(tmp_path / "m.h5")))
    assert str(bad) in str(exc.value)
    bad.unlink()
    with pytest.raises(DataError, match="does not exist") as exc:
        import_masks(job, Files(), Files(masks=str(tmp_path / "m.h5")))
    assert str(bad) in str(exc.value) and repr(ids[1]) in str(exc.value)
    with pytest.raises(ConfigError, match="format 'jpg'"):
        import_masks(job_for(prepared, {"dir": str(folder), "format": "jpg"}), Files(), Files(masks="x.h5"))


def test_shape_is_checked_as_height_by_width(tmp_path):
    write_image(tmp_path / "img.jpg", np.zeros((30, 40, 3), np.uint8))  # H 30, W 40
    size = image_size(tmp_path / "img.jpg")
    np.save(tmp_path / "ok.npy", {0: np.zeros((30, 40), np.float32)})
    np.save(tmp_path / "bad.npy", {0: np.zeros((40, 30), np.float32)})
    assert ex.read_reference_cams(tmp_path / "ok.npy", "psa", 3, size, labels=[1]).cams.shape == (1, 30, 40)
    with pytest.raises(DataError, match=r"bad\.npy: maps of shape \(40, 30\) \(H, W\); expected the image's "
                                        r"\(30, 40\)"):
        ex.read_reference_cams(tmp_path / "bad.npy", "psa", 3, size, labels=[1])
