"""End to end on the tiny toy run (tests/configs/tiny_toy_cam.yaml): seeds as branches of the DAG, and the
export -> import round trip giving the same numbers in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, run_snakemake, write_yaml
from wsss_core.config import deep_merge

pytestmark = pytest.mark.slow

CONFIGS = REPO / "tests" / "configs"


def _config(tmp_path: Path, *extra: dict) -> Path:
    cfg = yaml.safe_load((CONFIGS / "tiny_toy_cam.yaml").read_text())
    cfg = deep_merge(cfg, yaml.safe_load((CONFIGS / "roundtrip.yaml").read_text()))
    for e in extra:
        cfg = deep_merge(cfg, e)
    return write_yaml(tmp_path / "config.yaml", cfg)


def _jobs(stdout_stderr: str) -> set[str]:
    return {line.split("rule ", 1)[1].rstrip(":").strip() for line in stdout_stderr.splitlines()
            if line.startswith("rule ") or line.startswith("localrule ")}


def test_export_import_round_trip_and_two_seeds(tmp_path):
    cfg = _config(tmp_path)
    run_snakemake(tmp_path, "--cores", "2", "toy_cam_export", configfile=cfg)
    export = tmp_path / "results" / "toy" / "cam" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    prepared = tmp_path / "results" / "toy" / "dataset"
    lists = {p.stem: p.read_text().split() for p in (prepared / "lists").glob("*.txt")}
    assert sorted(p.stem for p in (export / "pseudo_masks").glob("*.png")) == sorted(lists["train_aug"])
    cam_ids = set(lists["train_aug"]) | set(lists["val"])
    assert sorted(p.stem for p in (export / "cams").glob("*.npy")) == sorted(cam_ids)
    cam = np.load(next((export / "cams").glob("*.npy")), allow_pickle=True).item()
    assert isinstance(cam, dict) and all(isinstance(k, int) and v.dtype == np.float32 for k, v in cam.items())
    assert "config_hashes" in json.dumps(manifest) and "provenance" in json.dumps(manifest)

    run_snakemake(tmp_path, "--cores", "2", "toy_roundtrip_report", configfile=cfg)
    report = json.loads((tmp_path / "results" / "toy" / "reports" / "roundtrip" / "report.json").read_text())
    rows = {r["experiment"]: r for r in report["rows"]}
    ours, back = rows["cam"], rows["cam_imported"]
    assert back["threshold"] == ours["threshold"]
    for stage in ("cam", "pseudo_mask", "segmentation"):
        assert back[stage]["miou"] == ours[stage]["miou"], stage
        assert back[stage]["miou_strict"] == ours[stage]["miou_strict"], stage
    assert report["per_class"]["experiments"]["cam_imported"] == report["per_class"]["experiments"]["cam"]
    assert back["provenance"]["backbone"] == "resnet50 (exported run)"
    assert not (tmp_path / "results" / "toy" / "cam_imported" / "classifier").exists()   # nothing trained

    # two seeds of the cam suite: seed 0 is the run above (not redone), seed 1 its own branch, dataset jobs shared
    seeds = _config(tmp_path, {"suites": {"cam": {"seeds": [0, 1]}}})
    proc = run_snakemake(tmp_path, "--cores", "2", "toy_cam_report", configfile=seeds)
    ran = _jobs(proc.stdout + proc.stderr)
    assert "train_classifier" in ran and not ran & {"make_toy_dataset", "prepare_dataset"}
    assert (tmp_path / "results" / "toy" / "cam-seed1" / "classifier" / "model.pt").is_file()
    report = json.loads((tmp_path / "results" / "toy" / "reports" / "cam" / "report.json").read_text())
    group = report["seeds"]["experiments"]["cam"]
    assert group["runs"] == ["cam", "cam-seed1"] and group["seeds"] == [0, 1]
    vals = [r["cam"]["miou"] for r in report["rows"]]
    assert group["metrics"]["cam.miou"]["values"] == vals
    assert group["metrics"]["cam.miou"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert vals[0] != vals[1]                                  # a different seed is a different run
    md = (tmp_path / "results" / "toy" / "reports" / "cam" / "report.md").read_text()
    assert "## Over seeds" in md
