"""Stage functions on real files (toy dataset, HDF5 shards, real CRF), without network training."""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pytest

from wsss_core.data.io import read_label_png
from wsss_core.data.prepare import DatasetInfo, prepare_dataset
from wsss_core.data.toy import make_toy_dataset
from wsss_core.stages.evaluate import cam_scores as eval_cams
from wsss_core.stages.evaluate import mask_scores as eval_masks
from wsss_core.stages.job import Files, JobSettings
from wsss_core.stages.refine import refine_crf
from wsss_core.store.shards import ShardedStore, ShardWriter, shard_ids

pytest.importorskip("pydensecrf")

EVAL = {"thresholds": {"start": 0.0, "stop": 0.6, "step": 0.01}, "mean": "present"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    make_toy_dataset(tmp / "toy", seed=3, image_size=64, n_train_aug=12, n_train=6, n_val=6, n_classes=3)
    prepare_dataset({"kind": "toy", "root": str(tmp / "toy")}, "toy", tmp / "prepared")
    info = DatasetInfo(tmp / "prepared")
    shards = []
    rng = np.random.default_rng(0)
    for split in ("train_aug", "val"):
        for k in range(2):
            path = tmp / "cams" / split / f"{k}-of-2.h5"
            with ShardWriter(path, "cams", {"split": split}) as w:
                for i in shard_ids(info.ids(split), k, 2):
                    gt = read_label_png(info.mask_path(i))
                    keys = np.array(info.labels(i))
                    # CAM-like maps: 0.45 inside the class (blurred edges), noise up to 0.15 everywhere:
                    # the best background threshold lies between 0.15 and 0.45
                    cams = np.stack([cv2.GaussianBlur((gt == c).astype(np.float32) * 0.45, (5, 5), 0) for c in keys])
                    cams += rng.uniform(0, 0.15, cams.shape).astype(np.float32)
                    w.add_cams(i, keys, cams)
            shards.append(str(path))
    return tmp, info, shards


def test_eval_cams_chooses_threshold_on_the_declared_split(setup):
    tmp, info, shards = setup
    res = eval_cams(str(tmp / "prepared"), shards, "train", "val", EVAL, str(tmp / "cams.json"))
    assert res["threshold"]["source"]["split"] == "train"
    assert res["threshold"]["source"]["search"] == "grid"                      # the default: whole-curve argmax
    assert res["threshold"]["source"]["swept_on_reported_split"] is False
    assert res["scores"]["train"]["threshold_chosen_on_this_split"] is True
    assert res["scores"]["val"]["threshold_chosen_on_this_split"] is False
    t = res["threshold"]["value"]
    assert 0.1 <= t < 0.45
    curve = res["curves"]["train"]
    assert curve["best_t"] == t and max(curve["miou"]) == pytest.approx(curve["best_miou"])
    assert res["scores"]["val"]["miou"] > 0.8  # maps equal to the masks (up to blur) score high
    assert res["curves"]["train"]["n_images"] == 6 and json.loads((tmp / "cams.json").read_text())["threshold"]["value"] == t


def test_refine_crf_parallel_equals_serial_and_is_scored(setup):
    tmp, info, shards = setup
    eval_cams(str(tmp / "prepared"), shards, "train", "val", EVAL, str(tmp / "cams.json"))
    outs = {}
    for workers in (1, 2):
        paths = []
        for k in range(2):
            out = tmp / f"masks{workers}" / f"{k}-of-2.h5"
            job = JobSettings(prepared=str(tmp / "prepared"), splits={"train": "train_aug"}, threads=2,
                              cfg={"preset": "seam_label", "n_workers": workers}, wildcards={"shard": k, "nshards": 2})
            refine_crf(job, Files(cams=shards, cam_eval=str(tmp / "cams.json")), Files(masks=str(out)))
            paths.append(str(out))
            with h5py.File(out) as fh:
                assert fh.attrs["bg_threshold_source"].startswith("chosen by eval_cams")
        with ShardedStore(paths) as store:
            outs[workers] = {i: m for i, m in store.items()}
        outs[f"paths{workers}"] = paths
    assert outs[1].keys() == outs[2].keys() == set(info.ids("train_aug"))
    for i in outs[1]:
        np.testing.assert_array_equal(outs[1][i], outs[2][i])
        assert set(np.unique(outs[1][i])) <= {0, *info.labels(i)}
    res = eval_masks(str(tmp / "prepared"), outs["paths1"], "train", str(tmp / "masks.json"))
    assert res["n_images"] == 6 and res["scores"]["miou"] > 0.7
