"""The superpixel stages: SCN training data, train_scn killed and resumed, eval_superpixels, the pipeline's hashes of
superpixel networks, and the thresholded pseudo-masks of ``refine: none``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO

SCN_CFG = {"recipe": "lab", "weights": None, "batch_size": 2, "crop_size": 32, "resize_long": [32, 48],
           "max_steps": 10, "lr": 0.0005, "pos_weight": 0.003, "improved_from": 0.5, "sal_threshold": 0.2,
           "th_bg": 0.05, "th_step": 0.5, "th_fg": 0.05, "relu_t": 0.75, "checkpoint_every": 5, "num_workers": 0,
           "eval_steps": 5, "eval_images": 3, "eval_low": 3, "poly_power": 0.9}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A prepared toy dataset (6 train_aug images of 48 px, 3 classes), its stand-in saliency and CAM shards."""
    from wsss_core.data.prepare import DatasetInfo, prepare_dataset
    from wsss_core.data.saliency import saliency_manifest
    from wsss_core.data.toy import make_toy_dataset
    from wsss_core.store.shards import ShardWriter

    root = tmp_path_factory.mktemp("spstages")
    make_toy_dataset(root / "toy", seed=5, image_size=48, n_train_aug=6, n_train=3, n_val=2, n_classes=3)
    prepare_dataset({"kind": "toy", "root": str(root / "toy")}, "toy", root / "prepared")
    saliency_manifest({"kind": "toy"}, root / "prepared", ["train_aug"], root / "saliency" / "manifest.json")
    info = DatasetInfo(root / "prepared")
    cams = root / "cams.h5"
    with ShardWriter(cams, "cams", {"split": "train_aug", "shard": 0, "n_shards": 1}) as w:
        for i in info.ids("train_aug"):
            keys = info.labels(i)
            w.add_cams(i, keys, np.random.default_rng(0).random((len(keys), 48, 48)).astype(np.float32))
    return {"root": root, "prepared": str(root / "prepared"), "saliency": str(root / "saliency" / "manifest.json"),
            "cams": str(cams), "info": info}


def test_superpixel_dataset_items(toy):
    from wsss_core.data.datasets import SuperpixelDataset
    from wsss_core.store.shards import ShardedStore

    info = toy["info"]
    ids = info.ids("train_aug")
    lab = SuperpixelDataset(info.image_dir, ids, 32, [32, 48], "lab", seed=1)[0]
    assert lab["image"].shape == (3, 32, 32) and lab["lab"].shape == (3, 32, 32)
    assert 0 <= lab["lab"].min() and lab["lab"].max() <= 1
    man = json.loads(open(toy["saliency"]).read())
    ds = SuperpixelDataset(info.image_dir, ids, 64, [48, 48], "saliency_cam", seed=1,
                           n_classes=info.n_classes - 1, saliency_dir=man["dir"], cam_shards=[toy["cams"]])
    item = ds[0]
    assert item["saliency"].shape == (1, 64, 64) and 0 <= item["saliency"].min() and item["saliency"].max() <= 1
    assert item["cam"].shape == (info.n_classes, 64, 64)
    present = set(info.labels(ids[0]))
    for c in range(info.n_classes):                       # channel = class value; bg and absent classes empty
        assert (item["cam"][c].abs().sum() > 0) == (c in present), c
    keys, cams = ShardedStore([toy["cams"]])[ids[0]]
    # a 48 px image at long side 48, padded into a 64 crop: the CAM mass is kept up to the flip and padding
    got = sorted(float(item["cam"][k].sum()) for k in keys)
    want = sorted(float(c.sum()) for c in cams)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    with pytest.raises(ValueError, match="saliency_cam recipe needs"):
        SuperpixelDataset(info.image_dir, ids, 64, [48, 48], "saliency_cam")


def _run_stage(fn: str, job: dict, inp: dict, out: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    code = ("import json, sys\nfrom wsss_core.stages.job import Files, JobSettings\n"
            f"from wsss_core.stages.superpixels import {fn}\n"
            "j, i, o = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
            f"{fn}(JobSettings(**j), Files(i), Files(o))\n")
    return subprocess.run([sys.executable, "-c", code, json.dumps(job), json.dumps(inp), json.dumps(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lab", "saliency_cam"])
def test_train_scn_killed_resumes_to_the_uninterrupted_weights(toy, tmp_path, recipe):
    cfg = {**SCN_CFG, "recipe": recipe}
    job = {"dataset": "toy", "experiment": "net", "prepared": toy["prepared"], "cfg": cfg, "config_hash": "h",
           "splits": {"train": "train_aug", "mask_eval": "train"}, "device": "cpu", "threads": 1}
    inp = {"saliency": [toy["saliency"]], "cams": [toy["cams"]]} if recipe == "saliency_cam" else {}
    ref = tmp_path / "ref" / "model.pt"
    p = _run_stage("train_scn", {**job, "log": str(tmp_path / "ref.log")}, inp, {"model": str(ref)})
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run" / "model.pt"
    p = _run_stage("train_scn", {**job, "log": str(tmp_path / "run.log")}, inp, {"model": str(run)},
                   env={"WSSS_FAULT": "train_step:7@run/state"})
    assert p.returncode == -9, p.stderr[-3000:]
    assert not run.exists()                                   # a killed job leaves no final weights
    p = _run_stage("train_scn", {**job, "log": str(tmp_path / "run.log")}, inp, {"model": str(run)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from checkpoint at step 5" in (tmp_path / "run.log").read_text()
    steps = [json.loads(x)["step"] for x in (run.parent / "state" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    a, b = torch.load(ref, weights_only=False)["model"], torch.load(run, weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (run.parent / "state" / "metrics.jsonl").read_text().splitlines()]
    assert all({"sem_loss", "pos_loss"} <= set(r) for r in rows)
    if recipe == "saliency_cam":
        assert all({"press_loss", "diff_loss"} <= set(r) for r in rows)
    # the trained file loads as an SCN (train_stage's {"model": state_dict} layout)
    from wsss_core.superpixel.scn import load_scn
    net, _ = load_scn({"path": str(run)})
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 9, 32, 32)


def test_eval_superpixels_scores_every_backend(toy, tmp_path):
    from wsss_core.superpixel.scn import SpixelNet

    torch.manual_seed(0)
    model = tmp_path / "scn.pth"
    torch.save(SpixelNet().state_dict(), model)
    job = {"dataset": "toy", "experiment": "net", "prepared": toy["prepared"], "cfg": SCN_CFG, "config_hash": "h",
           "splits": {"train": "train_aug", "mask_eval": "train"}, "device": "cpu", "threads": 1,
           "log": str(tmp_path / "e.log")}
    p = _run_stage("eval_superpixels", job, {"model": str(model)}, {"json": str(tmp_path / "eval.json")})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "eval.json").read_text())
    assert r["split"] == "train" and r["images"] == 3 and r["steps"] == 5 and r["low"] == 3
    assert set(r["backends"]) == {"scn", "soft_slic", "skimage_slic", "bilinear"}
    assert all(0 <= b["miou"] <= 1 for b in r["backends"].values())


def _config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_superpixel_networks_in_the_config_hashes():
    from wsss_core.pipeline import Pipeline

    base = Pipeline(_config())
    cfg = _config()
    cfg["superpixel_networks"]["msa"] = {"stages": {"scn": {"lr": 0.001}}}
    changed = Pipeline(cfg)
    assert base.scn_network("toy", "msa_image") == "msa" and base.scn_network("toy", "cam") is None
    for e in ("msa_image", "msa_sal"):                        # both MSA rows use that network
        assert base.hash("toy", e, "classifier") != changed.hash("toy", e, "classifier")
    for e in ("spcam", "spcam_eps", "cam", "sipe"):
        assert base.hash("toy", e, "classifier") == changed.hash("toy", e, "classifier")
    # the GT-reconstruction settings do not make another network
    cfg2 = _config()
    cfg2["datasets"]["toy"]["stages"]["scn"]["eval_images"] = 7
    assert Pipeline(cfg2).hash("toy", "msa", "scn") == base.hash("toy", "msa", "scn")
    assert Pipeline(cfg2).hash("toy", "msa", "scn_eval") != base.hash("toy", "msa", "scn_eval")
    assert Pipeline(cfg2).hash("toy", "msa", "q_maps") == base.hash("toy", "msa", "q_maps")
    before = Pipeline(cfg2).hash("toy", "msa", "scn_eval")
    cfg2["datasets"]["toy"]["stages"]["scn"]["n_shards"] = 3               # how the Q maps are sharded
    p2 = Pipeline(cfg2)
    assert p2.hash("toy", "msa", "scn_eval") == before
    assert p2.hash("toy", "msa", "scn") == base.hash("toy", "msa", "scn")
    assert len(p2.shards("q_maps", "toy", "msa")) == 3
    assert p2.shards("q_maps", "toy", "msa")[0] == "results/toy/superpixels/msa/q/val/0-of-3.h5"
    # SP-CAM's network is labelled by spcam_eps's CAMs: their settings reach it and SP-CAM's classifier
    cfg3 = _config()
    cfg3["experiments"]["spcam_eps"]["stages"]["cams"]["flip"] = False
    p3 = Pipeline(cfg3)
    assert p3.hash("toy", "spcam", "scn") != base.hash("toy", "spcam", "scn")
    assert p3.hash("toy", "spcam", "classifier") != base.hash("toy", "spcam", "classifier")
    assert p3.hash("toy", "msa", "scn") == base.hash("toy", "msa", "scn")
    # the walk grid is not part of the CAMs
    cfg4 = _config()
    cfg4["experiments"]["spcam"]["stages"]["cams"]["rw_grid"] = [0, 5]
    p4 = Pipeline(cfg4)
    assert p4.hash("toy", "spcam", "cams") == base.hash("toy", "spcam", "cams")
    assert p4.hash("toy", "spcam", "rw_grid") != base.hash("toy", "spcam", "rw_grid")
    assert base.mask_artifact("spcam") == "cam_masks" and base.mask_artifact("msa_sal") == "cam_masks"


def test_threshold_labels_without_crf():
    from wsss_core.stages.refine import threshold_labels

    cams = np.array([[[0.2, 0.5, 0.9]], [[0.6, 0.5, 0.1]]], np.float32)      # (2, 1, 3)
    assert threshold_labels(cams, [3, 7], 0.5).tolist() == [[7, 0, 3]]        # a tie goes to the background
    assert threshold_labels(cams, [3, 7], np.array([[0.7, 0.0, 0.0]])).tolist() == [[0, 3, 3]]
    assert threshold_labels(np.zeros((0, 1, 2), np.float32), [], 0.5).tolist() == [[0, 0]]


def test_a_missing_saliency_map_is_named(toy, tmp_path):
    import shutil

    from wsss_core.data.datasets import SuperpixelDataset
    from wsss_core.errors import DatasetError

    info = toy["info"]
    man = json.loads(open(toy["saliency"]).read())
    sal = tmp_path / "sal"
    shutil.copytree(man["dir"], sal)
    first = info.ids("train_aug")[0]
    (sal / f"{first}.png").unlink()
    ds = SuperpixelDataset(info.image_dir, info.ids("train_aug"), 32, [32, 48], "saliency_cam", 0,
                           info.n_classes - 1, str(sal), ".png", [toy["cams"]])
    with pytest.raises(DatasetError, match=rf"{first}\.png"):
        ds[0]


def test_superpixel_maps_shard_and_report_labels(toy, tmp_path):
    """The Q maps of the eval split in a float16 HDF5 shard (back end recorded), and the report's hard labels of a
    stored Q equal the torch ones on the padded grid."""
    from wsss_core.stages.report import superpixel_labels
    from wsss_core.store.shards import ShardedStore
    from wsss_core.superpixel import ops
    from wsss_core.superpixel.scn import SpixelNet

    torch.manual_seed(0)
    model = tmp_path / "scn.pth"
    torch.save(SpixelNet().state_dict(), model)
    job = {"dataset": "toy", "experiment": "net", "prepared": toy["prepared"], "cfg": SCN_CFG, "config_hash": "h",
           "splits": {"eval": "val"}, "device": "cpu", "threads": 1, "log": str(tmp_path / "q.log"),
           "wildcards": {"split": "val", "shard": "0", "nshards": "1"}}
    out = tmp_path / "q" / "val" / "0-of-1.h5"
    p = _run_stage("superpixel_maps", job, {"model": str(model)}, {"q": str(out)})
    assert p.returncode == 0, p.stderr[-3000:]
    with ShardedStore([out], kind="q", expect={"split": "val", "config_hash": "h"}) as store:
        assert store.ids() == sorted(toy["info"].ids("val")) and store.attrs["backend"] == "scn"
        q = store[store.ids()[0]]
    assert q.shape == (9, 48, 48) and np.allclose(q.sum(0), 1, atol=5e-3)
    qt = torch.from_numpy(q)[None]
    torch.testing.assert_close(torch.from_numpy(superpixel_labels(q)), ops.hard_labels(qt)[0])
    odd = np.random.default_rng(0).random((9, 40, 56)).astype(np.float32)          # not a multiple of 16
    padded = np.zeros((9, 48, 64), np.float32)
    padded[:, :40, :56] = odd
    want = ops.hard_labels(torch.from_numpy(padded)[None])[0, :40, :56].numpy()
    np.testing.assert_array_equal(superpixel_labels(odd), want)
