"""End-to-end runs of the pipeline on the toy dataset (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import run_snakemake, snakemake_cmd, write_yaml

pytestmark = pytest.mark.slow

TINY = {
    "datasets": {"toy": {
        "generator": {"n_train_aug": 48, "n_train": 16, "n_val": 16, "image_size": 64},
        "stages": {"classifier": {"max_steps": 400, "checkpoint_every": 20, "batch_size": 8, "crop_size": 64,
                                  "resize_long": [56, 72]}},
    }},
}


def test_sigkill_during_classifier_training_resumes_from_checkpoint(tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", TINY)
    target = "results/toy/cam/classifier/model.pt"
    ckpts = tmp_path / "results/toy/cam/classifier/state/checkpoints"
    log = tmp_path / "logs/toy/cam/train_classifier.log"
    proc = subprocess.Popen(snakemake_cmd(tmp_path, "--cores", "2", target, configfile=cfg), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list(ckpts.glob("step_*.pt")):
            assert proc.poll() is None, "snakemake ended before the first checkpoint"
            time.sleep(0.5)
        assert list(ckpts.glob("step_*.pt")), "no checkpoint within 10 minutes"
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: snakemake and the training job
        proc.wait()
    assert not (tmp_path / target).exists(), "a killed job must not leave its output"
    killed_at = max(int(p.stem.split("_")[1]) for p in ckpts.glob("step_*.pt"))
    assert 0 < killed_at < 400

    run_snakemake(tmp_path, "--unlock", configfile=cfg)
    run_snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", target, configfile=cfg)
    assert (tmp_path / target).is_file()
    text = log.read_text()
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", text)]
    assert resumed and resumed[-1] >= killed_at
    # the metrics log holds every step exactly once (steps after the checkpoint were dropped and re-logged)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "results/toy/cam/classifier/state/metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == list(range(1, 401))


def test_demo_end_to_end_and_noop_rerun(tmp_path):
    """The README's demo target with the default config: report written, CAMs beat all-background, rerun is a no-op."""
    run_snakemake(tmp_path, "--cores", "2", "toy_cam_report", timeout=1800)
    rep = tmp_path / "results/toy/reports/cam"
    for name in ("report.md", "report.json", "threshold_curves.png", "per_class_iou.png", "qualitative.png",
                 "training.png"):
        assert (rep / name).is_file(), name
    cam_eval = json.loads((tmp_path / "results/toy/cam/eval/cams.json").read_text())
    cam_miou = cam_eval["scores"]["val"]["miou"]
    seg = json.loads((tmp_path / "results/toy/cam/eval/segmentation.json").read_text())["scores"]["miou"]
    masks = json.loads((tmp_path / "results/toy/cam/eval/pseudo_masks.json").read_text())["scores"]["miou"]
    report = json.loads((rep / "report.json").read_text())
    baseline = report["baseline"]["miou"]
    assert report["baseline"]["split"] == "val" and 0.05 < baseline < 0.3
    assert cam_miou > baseline + 0.15, (cam_miou, baseline)
    assert masks > baseline and seg > baseline
    assert cam_eval["threshold"]["source"]["split"] == "train"

    again = run_snakemake(tmp_path, "--cores", "2", "toy_cam_report")
    assert "Nothing to be done" in again.stdout + again.stderr
    assert again.elapsed < 10, f"no-op rerun took {again.elapsed:.1f} s"

    # the plots are registered for Snakemake's HTML report
    run_snakemake(tmp_path, "--report", str(tmp_path / "report.html"), "toy_cam_report")
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "threshold_curves.png" in html and "qualitative.png" in html

    # changing a segmentation setting reruns the segmentation jobs and the report, nothing upstream
    cfg = write_yaml(tmp_path / "seg.yaml", {"datasets": {"toy": {"stages": {"segmentation": {"lr": 0.001}}}}})
    dry = run_snakemake(tmp_path, "-n", "toy_cam_report", configfile=cfg)
    table = dry.stdout[dry.stdout.index("Job stats:"):]
    jobs = set(re.findall(r"^(\w+)\s+\d+$", table, re.M)) - {"total"}
    assert jobs == {"train_segmentation", "infer_segmentation", "eval_segmentation", "report", "toy_cam_report"}, jobs

