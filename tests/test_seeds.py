"""Seeds: variant names, which seed a job gets, config hashes per branch; numbers over seeds (mean ± std, paired
comparison against scipy's paired t-test); provenance of rows and of imported experiments."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from wsss_core.config import (compared_to, experiment_config, experiment_seed, run_seeds, seed_variant,
                              split_seed_variant, suite_variants)
from wsss_core.metrics.seeds import mean_std, mean_std_vectors, paired_difference
from wsss_core.pipeline import Pipeline
from wsss_core.stages.job import runtime_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_variant_names_round_trip_and_the_workflow_seed_keeps_the_plain_name(config):
    assert seed_variant("ppc_fsae", 0, 0) == "ppc_fsae"
    assert seed_variant("ppc_fsae", 2, 0) == "ppc_fsae-seed2"
    assert split_seed_variant("ppc_fsae-seed2") == ("ppc_fsae", 2)
    assert split_seed_variant("ppc_fsae") == ("ppc_fsae", None)
    assert experiment_seed(config, "ppc_fsae-seed2") == 2 and experiment_seed(config, "ppc_fsae") == config["seed"]
    assert experiment_config(config, "ppc_fsae-seed2") == experiment_config(config, "ppc_fsae")
    assert runtime_settings(config, "sipe-seed7")["seed"] == 7 and runtime_settings(config, "sipe")["seed"] == 0
    assert runtime_settings(config, "msa")["seed"] == 0          # a superpixel network: the workflow seed


def test_suite_seeds_override_experiment_seeds_which_extends_inherits(config):
    cfg = copy.deepcopy(config)
    cfg["experiments"]["ppc"]["seeds"] = [0, 3]
    assert run_seeds(cfg, "ppc_fsae", "fsae") == [0, 3]         # inherited through extends
    assert run_seeds(cfg, "sipe", "fsae") == [0]
    cfg["suites"]["fsae"]["seeds"] = [1, 2]
    v = suite_variants(cfg, "fsae")
    assert v["ppc"] == ["ppc-seed1", "ppc-seed2"] and v["sipe"] == ["sipe-seed1", "sipe-seed2"]
    assert compared_to(cfg, "ppc_fsae") == "ppc" and compared_to(cfg, "ppc") is None
    cfg["experiments"]["sipe_fsae"]["compare_to"] = "ppc"
    assert compared_to(cfg, "sipe_fsae-seed1") == "ppc"


def test_each_seed_is_its_own_branch_and_seed_free_artifacts_are_shared(config):
    P = Pipeline(config)
    for artifact in ("classifier", "cams", "pseudo_masks", "segmentation", "seg_eval"):
        hashes = {P.hash("toy", e, artifact) for e in ("ppc", "ppc-seed1", "ppc-seed2")}
        assert len(hashes) == 3, artifact
    assert P.path("cams", dataset="toy", experiment="ppc-seed1", split="val", shard=0, nshards=2) \
        == "results/toy/ppc-seed1/cams/val/0-of-2.h5"
    # the plain name is seed 0's branch: the same hash a one-seed config gives
    one = copy.deepcopy(config)
    one["suites"]["fsae"]["seeds"] = [0, 1, 2]
    assert Pipeline(one).hash("toy", "ppc", "segmentation") == P.hash("toy", "ppc", "segmentation")
    assert P.hash("toy", "msa", "scn") == Pipeline(one).hash("toy", "msa", "scn")


def test_mean_std_is_numpys_sample_std_and_skips_missing_values():
    m = mean_std([0.2, 0.4, None, 0.9])
    assert m["mean"] == pytest.approx(0.5) and m["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert m["n"] == 3 and m["values"] == [0.2, 0.4, None, 0.9]
    assert mean_std([0.3])["std"] == 0.0 and mean_std([None])["mean"] is None
    v = mean_std_vectors([[0.1, None], [0.3, 0.5]])
    assert v["mean"] == pytest.approx([0.2, 0.5]) and v["n"] == [2, 1]
    with pytest.raises(ValueError):
        mean_std_vectors([[0.1], [0.1, 0.2]])


def test_paired_difference_equals_scipys_paired_t_test():
    a = {0: 0.21, 1: 0.25, 2: 0.19, 3: 0.30}
    b = {0: 0.36, 1: 0.33, 2: 0.31, 3: 0.40, 9: 0.99}        # seed 9 has no partner: left out
    p = paired_difference(a, b)
    x, y = np.array([a[s] for s in range(4)]), np.array([b[s] for s in range(4)])
    oracle = stats.ttest_rel(y, x)
    assert p["seeds"] == [0, 1, 2, 3] and p["differences"] == pytest.approx((y - x).tolist())
    assert p["t"] == pytest.approx(oracle.statistic) and p["p"] == pytest.approx(oracle.pvalue)
    ci = oracle.confidence_interval(0.95)
    assert p["ci"] == pytest.approx([ci.low, ci.high])
    assert p["exceeds_spread"] is True and p["spread_a"] == pytest.approx(np.std(x, ddof=1))
    noisy = paired_difference({0: 0.2, 1: 0.4, 2: 0.3}, {0: 0.25, 1: 0.3, 2: 0.36})
    assert noisy["exceeds_spread"] is False
    single = paired_difference({0: 0.2}, {0: 0.3})
    assert single["mean"] == pytest.approx(0.1) and single["ci"] is None and single["exceeds_spread"] is None


def test_provenance_of_trained_and_imported_experiments(config):
    cfg = copy.deepcopy(config)
    cfg["experiments"]["theirs"] = {"extends": "ppc", "refine": "import",
                                    "import": {"cams": {"dir": "x", "format": "psa"}, "pseudo_masks": {"dir": "y"},
                                               "provenance": {"backbone": "ResNet-38"}}}
    P = Pipeline(cfg)
    voc = P.provenance("voc", "sipe", [0, 1])
    assert voc["backbone"] == "resnet50" and voc["pretrained"] == "torchvision ResNet50_Weights.IMAGENET1K_V1"
    assert voc["refinement"] == "irn" and voc["seeds"] == "0, 1" and voc["segmentation"] == "DeepLab-V2 (resnet101)"
    assert voc["inference"].startswith("CAM scales 1.0, 0.5, 1.5, 2.0 + flip")
    toy = P.provenance("toy", "ppc")
    assert toy["backbone"] == "resnet38 (width 0.125)" and toy["pretrained"] == "none (random init)"
    assert toy["crf"].startswith("pseudo-masks yes (psa_softmax)")
    theirs = P.provenance("toy", "theirs")
    assert theirs["backbone"] == "ResNet-38" and theirs["pretrained"] == "not declared (imported)"
    # imported CAMs and masks hash their source, not the classifier's settings
    h = P.hash("toy", "theirs", "cams"), P.hash("toy", "theirs", "pseudo_masks")
    cfg["experiments"]["ppc"]["stages"]["classifier"]["lr"] = 0.5
    cfg["experiments"]["theirs"]["import"]["cams"]["dir"] = "z"
    P2 = Pipeline(cfg)
    assert P2.hash("toy", "theirs", "pseudo_masks") == h[1] and P2.hash("toy", "theirs", "cams") != h[0]
    assert P2.mask_artifact("theirs") == "imported_masks"
