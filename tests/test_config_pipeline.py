"""The config's experiment inheritance and merge order, and the artifact table: paths, settings, config hashes."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from wsss_core.config import STAGES, experiment_config, stage_config
from wsss_core.errors import ConfigError
from wsss_core.pipeline import ARTIFACTS, REFINERS, Pipeline


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_extends_inherits_all_but_the_label_and_the_child_wins(config):
    c = copy.deepcopy(config)
    c["experiments"].update(
        a={"method": "cam", "label": "A", "refine": "irn", "stages": {"crf": {"n_shards": 3, "n_workers": 5}}},
        b={"extends": "a", "stages": {"crf": {"n_shards": 4}}},
        d={"extends": "b", "label": "D", "method": "ppc"})
    b, d = experiment_config(c, "b"), experiment_config(c, "d")
    assert "label" not in b and b["method"] == "cam" and b["refine"] == "irn"
    assert b["stages"]["crf"] == {"n_shards": 4, "n_workers": 5}
    assert d["label"] == "D" and d["method"] == "ppc" and d["stages"]["crf"] == {"n_shards": 4, "n_workers": 5}
    assert "extends" not in d


def test_extends_errors_name_the_cycle_and_the_unknown_parent(config):
    c = copy.deepcopy(config)
    c["experiments"].update(x={"extends": "y", "method": "cam"}, y={"extends": "x"}, z={"extends": "nope"})
    with pytest.raises(ConfigError, match="cycle: x -> y -> x"):
        experiment_config(c, "x")
    with pytest.raises(ConfigError, match=r"experiments\.z\.extends: unknown experiment 'nope'"):
        experiment_config(c, "z")


def test_merge_order_stage_dataset_experiment_experiment_dataset(config):
    """stages <- datasets.D.stages <- experiments.E.stages <- experiments.E.datasets.D.stages, E's chain first."""
    c = copy.deepcopy(config)
    c["stages"]["crf"].update(n_workers=1, bg_alpha=None, preset="seam_label", n_shards=8)
    c["datasets"]["toy"]["stages"]["crf"] = {"n_workers": 2, "bg_alpha": 2, "n_shards": 5}
    c["experiments"].update(
        p={"method": "cam", "stages": {"crf": {"bg_alpha": 3, "preset": "psa_softmax"}},
           "datasets": {"toy": {"stages": {"crf": {"preset": "deeplab_test"}}}}},
        q={"extends": "p", "stages": {"crf": {"n_shards": 7}}})
    q = stage_config(c, "toy", "q", "crf")
    # dataset beats defaults (n_workers), the experiment beats the dataset (bg_alpha), the experiment's own
    # dataset block beats its stages (preset, inherited from p), and q's own stage settings beat the toy dataset's
    assert (q["n_workers"], q["bg_alpha"], q["preset"], q["n_shards"]) == (2, 3, "deeplab_test", 7)


def test_every_toy_experiment_resolves_and_extends_keep_the_parents_toy_settings(config):
    for exp in config["experiments"]:
        for stage in STAGES:
            if stage != "scn":  # the scn stage belongs to superpixel networks, not experiments
                stage_config(config, "toy", exp, stage)
    for net in config["superpixel_networks"]:
        stage_config(config, "toy", net, "scn")
    assert stage_config(config, "toy", "spcam", "scn")["weights"] is None            # the toy override wins
    assert stage_config(config, "voc", "spcam", "scn")["weights"] == {"path": "weights/SpixelNet_bsd_ckpt.tar"}
    assert stage_config(config, "toy", "msa", "scn")["recipe"] == "lab"
    assert (stage_config(config, "toy", "ppc_fsae", "classifier")["max_steps"]
            == stage_config(config, "toy", "ppc", "classifier")["max_steps"] == 600)
    assert stage_config(config, "voc", "ppc_fsae", "classifier")["max_steps"] == 40000
    assert experiment_config(config, "sipe_fsae")["refine"] == "irn"


def test_artifact_paths_are_one_table():
    p = Pipeline({"results_dir": "res", "datasets": {}, "experiments": {}, "stages": {}, "seed": 0})
    assert p.template("cams") == "res/{dataset}/{experiment}/cams/{split}/{shard}-of-{nshards}.h5"
    assert p.path("classifier", dataset="toy", experiment="cam") == "res/toy/cam/classifier/model.pt"
    assert set(REFINERS.values()) <= set(ARTIFACTS)
    for name, a in ARTIFACTS.items():  # every upstream name is an artifact (or the refine alias)
        assert set(a.after) <= set(ARTIFACTS) | {"pseudo_masks"}, name
        # sharded HDF5 outputs have a shard kind; coco_masks' per-shard JSON markers are not HDF5
        assert (a.kind is None) == ("{shard}" not in a.path or a.path.endswith(".json")), name


def _hashes(config, exp="cam"):
    p = Pipeline(config)
    return {a: p.hash("toy", exp, a) for a in ("classifier", "cams", "cam_eval", "crf_masks", "pseudo_masks",
                                               "segmentation", "seg_pred", "affinity", "rw_masks", "ir_labels",
                                               "irn", "irn_masks")}


def test_hashes_follow_the_declared_dependencies(config):
    base = _hashes(config)
    assert base["pseudo_masks"] == base["crf_masks"]  # refine: crf
    c = copy.deepcopy(config)
    c["datasets"]["toy"]["stages"]["crf"]["n_workers"] = 7
    h = _hashes(c)
    changed = {a for a in base if base[a] != h[a]}
    assert changed == {"crf_masks", "pseudo_masks", "segmentation", "seg_pred"}
    c = copy.deepcopy(config)
    c["datasets"]["toy"]["stages"]["irn"]["rw"]["beta"] = 3
    h = _hashes(c)
    assert {a for a in base if base[a] != h[a]} == {"irn_masks"}  # the walk only: not the labels nor IRN training
    c = copy.deepcopy(config)
    c["seed"] = 1
    h = _hashes(c)
    assert all(base[a] != h[a] for a in base)
    c = copy.deepcopy(config)
    c["experiments"]["cam"]["refine"] = "affinity"
    h = _hashes(c)
    assert h["pseudo_masks"] == h["rw_masks"] and h["segmentation"] != base["segmentation"]
    assert h["cams"] == base["cams"]
