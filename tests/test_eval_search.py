"""Background-threshold search (``stages.eval.search``): grid argmax vs MCTformer's greedy early stop.

The store is made by hand on the 16x16 dataset of ``test_report`` so that the mIoU curve has two peaks: a first
local maximum at t = 0.10 and the global maximum at t = 0.40 (checked by the tests, not assumed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import EVAL_CFG, SPLITS, make_dataset

from wsss_core.data.io import read_label_png
from wsss_core.data.prepare import DatasetInfo
from wsss_core.metrics import (ConfusionMatrix, cam_to_labels, greedy_scan, greedy_threshold_search,
                               search_criterion, select_index)
from wsss_core.stages.evaluate import cam_scores as eval_cams
from wsss_core.store.shards import ShardedStore, ShardWriter

FIRST_PEAK, GLOBAL_PEAK = 2, 8    # indices into EVAL_CFG's thresholds 0.00, 0.05, ..., 0.55


# ============================================================================================ pure rule

def test_greedy_takes_the_first_local_maximum_grid_the_global_one():
    v = [0.1, 0.3, 0.5, 0.4, 0.9, 0.2]
    assert select_index(v, "greedy") == 2 and select_index(v, "grid") == 4
    assert select_index([0.2, 0.2, 0.9], "greedy") == 0          # a plateau is no improvement: the walk stops
    assert select_index([0.2, 0.2, 0.9], "grid") == 2
    assert select_index([0.5, 0.1, 0.5], "grid") == 0            # ties: the smallest threshold
    assert select_index([0.1, None, 0.9], "greedy") == 0         # NaN stops the walk
    assert select_index([None, 0.3, 0.9], "grid") == 2 and select_index([None, 0.3], "greedy") is None
    assert select_index([None, None], "grid") is None
    assert select_index([0.1, 0.2, 0.3], "greedy") == 2          # monotone: the last threshold
    with pytest.raises(ValueError, match="unknown threshold search"):
        select_index(v, "bisect")


def test_greedy_scan_reads_values_lazily_and_stops_at_the_first_non_improvement():
    read = []

    def values():
        for v in [0.1, 0.3, 0.2, 0.9, 1.0]:
            read.append(v)
            yield v

    i, seen = greedy_scan(values())
    assert i == 1 and seen == [0.1, 0.3, 0.2] and read == seen   # 0.9 and 1.0 are never computed


def test_criterion_names_the_rule():
    thr = [0.0, 0.05, 0.1]
    assert search_criterion("grid", "strict", thr) == "argmax of strict mIoU over 3 thresholds 0..0.1"
    g = search_criterion("greedy", "strict", thr)
    assert "greedy" in g and "first local maximum" in g and "first non-improvement" in g


# ============================================================================================ on a CAM store

def _designed_cams(mask: np.ndarray, keys: list[int]) -> np.ndarray:
    """(K, H, W) maps whose max is 0.02 / 0.07 / 0.37 on background pixels (30 % / 30 % / 40 %) and 0.12 / 0.52 on
    the pixels of the map's class (30 % / 70 %); 0 on other classes' pixels. Raising t first frees background
    (up), then loses the weak foreground at 0.15 (down), then frees most background at 0.40 (the global peak)."""
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    r = ((yy * 7 + xx * 3) % 10) / 10.0
    out = []
    for c in keys:
        ch = np.where(r < 0.3, 0.02, np.where(r < 0.6, 0.07, 0.37))
        ch = np.where(mask == c, np.where(r < 0.3, 0.12, 0.52), ch)
        ch = np.where((mask != c) & (mask != 0) & (mask != 255), 0.0, ch)
        out.append(ch)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    prep, masks = make_dataset(root)
    labels = json.loads((prep / "labels.json").read_text())["labels"]
    shards = []
    for split in ("train", "val"):
        path = root / "cams" / split / "0-of-1.h5"
        with ShardWriter(path, "cams", {"split": split, "shard": 0, "n_shards": 1}) as w:
            for i in SPLITS[split]:
                w.add_cams(i, np.array(labels[i], np.int64), _designed_cams(masks[i], labels[i]))
        shards.append(str(path))
    res = {s: eval_cams(str(prep), shards, "train", "val", {**EVAL_CFG, "search": s}, str(root / f"{s}.json"))
           for s in ("grid", "greedy")}
    return {"root": root, "prep": prep, "shards": shards, "res": res}


def test_eval_cams_greedy_stops_at_the_first_peak_grid_finds_the_global_one(store):
    grid, greedy = store["res"]["grid"], store["res"]["greedy"]
    miou = np.array(grid["curves"]["train"]["miou"])
    thr = grid["curves"]["train"]["thresholds"]
    # the premise: a strict first local maximum, and a higher peak later
    assert miou[0] < miou[1] < miou[FIRST_PEAK] > miou[FIRST_PEAK + 1]
    assert int(np.argmax(miou)) == GLOBAL_PEAK and miou[GLOBAL_PEAK] > miou[FIRST_PEAK] + 0.1
    assert grid["threshold"]["value"] == pytest.approx(thr[GLOBAL_PEAK])
    assert greedy["threshold"]["value"] == pytest.approx(thr[FIRST_PEAK])
    assert greedy["threshold"]["source"]["miou_at_value"] == pytest.approx(miou[FIRST_PEAK])
    assert greedy["curves"]["train"]["miou"] == grid["curves"]["train"]["miou"]   # same curve, other rule
    assert (grid["threshold"]["source"]["search"], greedy["threshold"]["source"]["search"]) == ("grid", "greedy")
    assert grid["threshold"]["source"]["criterion"].startswith("argmax of present-class mIoU")
    assert "first local maximum" in greedy["threshold"]["source"]["criterion"]
    # the scores follow the chosen t: val scored at 0.10 under greedy, at 0.40 under grid
    assert greedy["scores"]["val"]["miou"] == pytest.approx(greedy["curves"]["val"]["miou"][FIRST_PEAK])
    assert grid["scores"]["val"]["miou"] == pytest.approx(grid["curves"]["val"]["miou"][GLOBAL_PEAK])
    written = json.loads((store["root"] / "greedy.json").read_text())
    assert written["threshold"]["source"]["search"] == "greedy"


@pytest.mark.parametrize("split", ["train", "val"])
def test_greedy_on_the_curve_equals_a_sequential_per_threshold_evaluation(store, split):
    """The reference's loop: compute the mIoU at one t (cam_to_labels + ConfusionMatrix), stop at the first
    non-improvement. Reading the same rule off the one-pass ThresholdCurve gives the same t and mIoUs."""
    info = DatasetInfo(store["prep"])
    curve = store["res"]["greedy"]["curves"][split]
    calls = []

    def miou_at(t: float) -> float:
        calls.append(t)
        conf = ConfusionMatrix(info.n_classes)
        with ShardedStore(store["shards"]) as st:
            for i in info.ids(split):
                keys, cams = st[i]
                conf.update(read_label_png(info.mask_path(i), info.n_classes), cam_to_labels(cams, keys, t))
        return conf.scores()["miou"]

    t, best, seen = greedy_threshold_search(miou_at, curve["thresholds"])
    assert t == pytest.approx(curve["best_t"]) and best == pytest.approx(curve["best_miou"])
    assert seen == pytest.approx(curve["miou"][: len(seen)])
    assert len(calls) == FIRST_PEAK + 2 < len(curve["thresholds"])   # it stopped one past the first peak


def test_unknown_search_is_rejected_before_any_work(store, tmp_path):
    from wsss_core.errors import ConfigError

    with pytest.raises(ConfigError, match="stages.eval.search"):
        eval_cams(str(store["prep"]), store["shards"], "train", "val", {**EVAL_CFG, "search": "bisect"},
                  str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_config_documents_the_search_and_the_schema_restricts_it():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    from conftest import REPO

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    ev_schema = {**schema["$defs"]["eval"], "$defs": schema["$defs"]}
    ev = yaml.safe_load((REPO / "config.yaml").read_text())["stages"]["eval"]
    assert ev["search"] == "grid"                           # the default keeps the exhaustive sweep
    for search in ("grid", "greedy"):
        jsonschema.validate({**ev, "search": search}, ev_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**ev, "search": "bisect"}, ev_schema)
