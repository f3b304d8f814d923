"""End-to-end runs of the pipeline on the toy dataset (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_group, run_snakemake, start_snakemake, write_yaml

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
    proc = start_snakemake(tmp_path, "--cores", "2", target, configfile=cfg)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list(ckpts.glob("step_*.pt")):
            assert proc.poll() is None, "snakemake ended before the first checkpoint"
            time.sleep(0.5)
        assert list(ckpts.glob("step_*.pt")), "no checkpoint within 10 minutes"
        time.sleep(1.0)
    finally:
        kill_group(proc)  # the whole process group: snakemake and the training job
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
    assert again.elapsed < 60, f"no-op rerun took {again.elapsed:.1f} s"  # gross-regression guard

    # the finished run folder (results with the toy dataset, .snakemake) moved elsewhere is up to date there
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved, symlinks=True)  # copy2: modification times kept
    shutil.rmtree(tmp_path / "results")
    there = run_snakemake(moved, "-n", "toy_cam_report")
    assert "Nothing to be done" in there.stdout + there.stderr, there.stdout[-3000:]
    manifest = json.loads((moved / "results/toy/dataset/manifest.json").read_text())
    assert not Path(manifest["root"]).is_absolute() and not Path(manifest["image_dir"]).is_absolute()
    (moved / "results/toy/reports/cam/report.md").unlink()  # the report job reads images and shards: from `moved`
    redo = run_snakemake(moved, "--cores", "2", "toy_cam_report")
    assert set(re.findall(r"^(?:local)?rule (\w+):", redo.stdout + redo.stderr, re.M)) == {"report", "toy_cam_report"}
    shutil.copytree(moved / "results", tmp_path / "results", symlinks=True)

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



TINY_SIPE = {"classifier": {"max_steps": 20, "checkpoint_every": 10, "batch_size": 4, "crop_size": 64,
                            "resize_long": [56, 72]},
             "cams": {"scales": [1.0], "n_shards": 1},
             "irn": {"batch_size": 4, "crop_size": 64, "radius": 5, "max_steps": 6, "checkpoint_every": 3,
                     "n_shards": 1},
             "segmentation": {"max_steps": 10, "crop_size": 64, "batch_size": 4, "n_shards": 1}}
TINY_DATA = {"generator": {"n_train_aug": 24, "n_train": 12, "n_val": 12, "image_size": 64}}


def test_toy_sfc_report_end_to_end_through_irn(tmp_path):
    """SFC on a tiny toy dataset through the IRN stage: prototype + PCM CAMs in the cache, confident labels,
    IRN, two-pass random walk, report with the refinement table."""
    cfg = write_yaml(tmp_path / "tiny.yaml", {"datasets": {"toy": TINY_DATA},
                                             "experiments": {"sfc": {"datasets": {"toy": {"stages": TINY_SIPE}}}}})
    run_snakemake(tmp_path, "--cores", "2", "toy_sfc_report", configfile=cfg)
    import h5py
    with h5py.File(tmp_path / "results/toy/sfc/cams/val/0-of-1.h5", "r") as fh:
        g = fh[sorted(fh.keys())[0]]
        assert g["keys"][0] == 0 and g["aux"].shape == g["cams"].shape  # bg map first; IS_CAM1 beside IS_CAM
    cam_eval = json.loads((tmp_path / "results/toy/sfc/eval/cams.json").read_text())
    assert cam_eval["threshold"]["own_bg"] is True
    ir = json.loads((tmp_path / "results/toy/sfc/eval/ir_labels.json").read_text())
    assert 0.0 < ir["labelled_fraction"] <= 1.0
    assert list((tmp_path / "results/toy/sfc/pseudo_masks_irn").glob("*.h5"))
    assert not (tmp_path / "results/toy/sfc/pseudo_masks").exists()
    rep = json.loads((tmp_path / "results/toy/reports/sfc/report.json").read_text())
    (ref,) = rep["refinement"]
    assert ref["refinement"] == "IRN random walk" and ref["ir_labels"]["labelled_fraction"] == ir["labelled_fraction"]
    md = (tmp_path / "results/toy/reports/sfc/report.md").read_text()
    assert "## Pseudo-mask refinement" in md and "`sfc`: no background threshold" in md
    assert rep["thresholds"][0]["own_bg"] is True
    rows = [json.loads(x) for x in (tmp_path / "results/toy/sfc/classifier/state/metrics.jsonl").read_text().splitlines()]
    assert all({"loss_cls", "loss_gsc", "loss_ms", "grad_norm"} <= set(r) for r in rows)
    # a random-walk setting reruns the walk and what follows it, not the confident labels or IRN training
    import yaml
    doc = yaml.safe_load(cfg.read_text())
    doc["experiments"]["sfc"]["datasets"]["toy"]["stages"]["irn"]["rw"] = {"exp_times": 3}
    cfg2 = write_yaml(tmp_path / "rw.yaml", doc)
    dry = run_snakemake(tmp_path, "-n", "toy_sfc_report", configfile=cfg2)
    table = dry.stdout[dry.stdout.index("Job stats:"):]
    jobs = set(re.findall(r"^(\w+)\s+\d+$", table, re.M)) - {"total"}
    assert jobs == {"make_sem_seg_labels", "eval_pseudo_masks", "train_segmentation", "infer_segmentation",
                    "eval_segmentation", "report", "toy_sfc_report"}, jobs


TINY_MCT = {"classifier": {"max_steps": 20, "checkpoint_every": 10, "batch_size": 4, "crop_size": 64,
                           "resize_long": [56, 72],
                           "backbone": {"img_size": 64, "embed_dim": 32, "depth": 3, "heads": 2}},
            "cams": {"scales": [1.0], "n_shards": 1},
            "affinity": {"batch_size": 4, "crop_size": 72, "max_steps": 10, "checkpoint_every": 5, "n_shards": 1,
                         "backbone": {"width": 0.0625}},
            "segmentation": {"max_steps": 10, "crop_size": 64, "batch_size": 4, "n_shards": 1}}


def test_toy_fsae_report_end_to_end_with_all_rows(tmp_path):
    """The FSAE suite on a tiny toy dataset: PPC, PPC + FSAE, SIPE, SIPE + FSAE, MCTformer-V2 and MCTformer-V2 +
    FSAE rows, stand-in saliency labelled, FSAE losses logged per step, SIPE rows refined by IRN, MCTformer rows by
    the AffinityNet random walk; with the MCTformer report (V1, V2) from the same run (V2 built once)."""
    tiny_stages = {"classifier": {"max_steps": 30, "checkpoint_every": 10, "batch_size": 4, "crop_size": 64,
                                  "resize_long": [56, 72], "ppc": {"view2_size": 32}},
                   "cams": {"scales": [1.0], "n_shards": 1},
                   "crf": {"n_shards": 1},
                   "segmentation": {"max_steps": 20, "crop_size": 64, "batch_size": 4, "n_shards": 1}}
    cfg = write_yaml(tmp_path / "tiny.yaml", {
        "datasets": {"toy": {"generator": {"n_train_aug": 24, "n_train": 12, "n_val": 12, "image_size": 64}}},
        "experiments": {**{e: {"datasets": {"toy": {"stages": tiny_stages}}} for e in ("ppc", "ppc_fsae")},
                        **{e: {"datasets": {"toy": {"stages": TINY_SIPE}}} for e in ("sipe", "sipe_fsae")},
                        **{e: {"datasets": {"toy": {"stages": TINY_MCT}}}
                           for e in ("mctformer_v1", "mctformer", "mctformer_fsae")}},
    })
    # the PPC row takes its pseudo-masks from the AffinityNet random walk (the optional refinement)
    tiny_aff = {"backbone": {"width": 0.0625, "weights": None, "frozen_bn": False},
                "batch_size": 4, "crop_size": 72, "max_steps": 10, "checkpoint_every": 5, "num_workers": 0,
                "n_shards": 1}
    import yaml
    doc = yaml.safe_load(cfg.read_text())
    doc["experiments"]["ppc"].update(stages={"affinity": tiny_aff}, refine="affinity")
    doc["experiments"]["ppc_fsae"]["refine"] = "crf"  # it extends ppc
    cfg.write_text(yaml.safe_dump(doc))
    run_snakemake(tmp_path, "--cores", "2", "toy_fsae_report", "toy_mctformer_report", configfile=cfg)
    md = (tmp_path / "results/toy/reports/fsae/report.md").read_text()
    assert "`ppc` (PPC)" in md and "`ppc_fsae` (PPC + FSAE)" in md
    assert "stand-in saliency" in md
    rep = json.loads((tmp_path / "results/toy/reports/fsae/report.json").read_text())
    assert [r["experiment"] for r in rep["rows"]] == ["ppc", "ppc_fsae", "sipe", "sipe_fsae", "mctformer",
                                                      "mctformer_fsae"]
    assert "`sipe_fsae` (SIPE + FSAE)" in md
    assert [x["refinement"] for x in rep["refinement"]] == ["AffinityNet random walk", "dense CRF", "IRN random walk",
                                                           "IRN random walk", "AffinityNet random walk",
                                                           "AffinityNet random walk"]
    assert "`mctformer_fsae` (MCTformer-V2 + FSAE)" in md
    mct = json.loads((tmp_path / "results/toy/reports/mctformer/report.json").read_text())
    assert [r["experiment"] for r in mct["rows"]] == ["mctformer_v1", "mctformer"]
    for e in ("mctformer_v1", "mctformer", "mctformer_fsae"):
        ev = json.loads((tmp_path / f"results/toy/{e}/eval/cams.json").read_text())
        assert ev["threshold"]["source"]["search"] == "greedy" and ev["threshold"]["own_bg"] is False
        assert (tmp_path / f"results/toy/{e}/affinity/model.pt").is_file()
    v2 = [json.loads(x) for x in (tmp_path / "results/toy/mctformer/classifier/state/metrics.jsonl").read_text().splitlines()]
    v1 = [json.loads(x) for x in (tmp_path / "results/toy/mctformer_v1/classifier/state/metrics.jsonl").read_text().splitlines()]
    assert len(v2) == 20 and all("loss_patch" in r for r in v2) and not any("loss_patch" in r for r in v1)
    mf = [json.loads(x) for x in (tmp_path / "results/toy/mctformer_fsae/classifier/state/metrics.jsonl").read_text().splitlines()]
    assert all({"loss_cls", "loss_patch", "loss_pl", "teacher_conf"} <= set(r) for r in mf)
    assert mf[0]["lr"] < mf[-1]["lr"] or mf[0]["lr"] == 1e-6  # AdamW warm-up from 1e-6, not the poly decay
    sf = [json.loads(x) for x in (tmp_path / "results/toy/sipe_fsae/classifier/state/metrics.jsonl").read_text().splitlines()]
    assert len(sf) == 20 and all({"loss_cls", "loss_gsc", "loss_pl", "teacher_conf", "mask_ratio"} <= set(r) for r in sf)
    for r in rep["rows"]:
        for col in ("cam", "pseudo_mask", "segmentation"):
            assert 0.0 <= r[col]["miou"] <= 1.0
    lines = (tmp_path / "results/toy/ppc_fsae/classifier/state/metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss_sup", "loss_pl", "teacher_conf", "mask_ratio", "ring_ratio", "agreement", "loss_sal"):
        assert all(key in r for r in rows), key
    base = [json.loads(x) for x in (tmp_path / "results/toy/ppc/classifier/state/metrics.jsonl").read_text().splitlines()]
    assert "loss_pl" not in base[0] and "loss_nce" in base[0]
    assert (tmp_path / "results/toy/ppc/affinity/model.pt").is_file()
    assert list((tmp_path / "results/toy/ppc/pseudo_masks_rw").glob("*.h5"))
    assert not (tmp_path / "results/toy/ppc/pseudo_masks").exists()
    assert list((tmp_path / "results/toy/ppc_fsae/pseudo_masks").glob("*.h5"))
    # the saliency artifact is made once and shared by both branches
    assert len(list((tmp_path / "results/toy/saliency/maps").glob("*.png"))) == 24


def test_toy_superpixel_suites_end_to_end(tmp_path):
    """toy_spcam_report and toy_msa_report on a tiny toy dataset: the superpixel networks trained (SP-CAM's labelled
    by its stage-1 CAMs), SP-CAM's (walk, threshold) grid, MSA's network shared by both rows, the back end and the
    GT-reconstruction scores in the report; a second run does nothing."""
    small = {"max_steps": 20, "batch_size": 4, "crop_size": 64, "resize_long": [56, 72]}
    cfg = write_yaml(tmp_path / "tiny.yaml", {
        "datasets": {"toy": {
            "generator": {"n_train_aug": 24, "n_train": 12, "n_val": 12, "image_size": 64},
            "stages": {"classifier": {**small, "checkpoint_every": 10},
                       "scn": {**small, "checkpoint_every": 10, "eval_images": 8},
                       "cams": {"scales": [1.0], "n_shards": 1}, "crf": {"n_shards": 1},
                       "segmentation": {"max_steps": 10, "crop_size": 64, "batch_size": 4, "n_shards": 1}}}},
        "experiments": {e: {"datasets": {"toy": {"stages": {"classifier": small, "cams": {"scales": [1.0]}}}}}
                        for e in ("spcam_eps", "msa_image")},
        "superpixel_networks": {"spcam": {"datasets": {"toy": {"stages": {"scn": {"max_steps": 20,
                                                                                 "batch_size": 4}}}}}},
    })
    run_snakemake(tmp_path, "--cores", "2", "toy_spcam_report", "toy_msa_report", configfile=cfg)
    sp = json.loads((tmp_path / "results/toy/reports/spcam/report.json").read_text())
    msa = json.loads((tmp_path / "results/toy/reports/msa/report.json").read_text())
    assert [r["experiment"] for r in sp["rows"]] == ["spcam_eps", "spcam"]
    assert [r["experiment"] for r in msa["rows"]] == ["msa_image", "msa_sal"]
    for r in sp["rows"] + msa["rows"]:
        for col in ("cam", "pseudo_mask", "segmentation"):
            assert 0.0 <= r[col]["miou"] <= 1.0
    assert [x["refinement"] for x in sp["refinement"] + msa["refinement"]] == ["none (thresholded CAMs)"] * 4
    rows = {x["experiment"]: x for x in sp["superpixels"] + msa["superpixels"]}
    assert set(rows) == {"spcam", "msa_image", "msa_sal"}
    assert rows["spcam"]["network"] == "spcam" and rows["msa_sal"]["network"] == "msa"
    for x in rows.values():
        assert x["backend"] == "scn"
        assert set(x["gt_reconstruction"]["miou"]) == {"scn", "soft_slic", "skimage_slic", "bilinear"}
    grid = rows["spcam"]["rw_grid"]
    assert grid["rw_grid"] == [0, 20, 30, 40] and grid["configured_n"] == 20 and grid["chosen"]["split"] == "train"
    assert set(grid["curves"]) == {"train", "val"} and grid["n0_vs_best"]["n0"] is not None
    md = (tmp_path / "results/toy/reports/spcam/report.md").read_text()
    assert "## Superpixels" in md and "walk steps n" in md and "superpixels.png" in md
    assert (tmp_path / "results/toy/reports/spcam/superpixels.png").stat().st_size > 1000
    # the SCN of SP-CAM trained on stage-1 CAMs: its improved-loss terms are logged; MSA's network is made once
    scn_rows = [json.loads(x) for x in (tmp_path / "results/toy/superpixels/spcam/state/metrics.jsonl")
                .read_text().splitlines()]
    assert len(scn_rows) == 20 and all({"press_loss", "diff_loss"} <= set(r) for r in scn_rows)
    assert sorted(p.name for p in (tmp_path / "results/toy/superpixels").iterdir()) == ["msa", "spcam"]
    from wsss_core.store.shards import ShardedStore
    with ShardedStore(sorted((tmp_path / "results/toy/superpixels/msa/q/val").glob("*.h5")), kind="q") as store:
        assert len(store) == 12 and store.attrs["backend"] == "scn" and store.attrs["network"] == "msa"
        q = store[store.ids()[0]]
        assert q.shape == (9, 64, 64) and np.allclose(q.sum(0), 1, atol=5e-3)   # float16 storage
    dry = run_snakemake(tmp_path, "-n", "toy_spcam_report", "toy_msa_report", configfile=cfg)
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_toy_rtc_and_toycoco_reports_end_to_end(tmp_path):
    """toy_rtc_report (single-stage maps, their curve, CRF labels of val and train, DeepLab on the latter) and
    toycoco_cam_report (the COCO-format toy: masks from the instances files, 81 classes) on tiny datasets; a second
    run does nothing."""
    small = {"max_steps": 10, "batch_size": 4, "crop_size": 64, "resize_long": [56, 72], "checkpoint_every": 5}
    seg = {"max_steps": 10, "crop_size": 64, "batch_size": 4, "n_shards": 1}
    gen = {"n_train_aug": 16, "n_train": 8, "n_val": 8, "image_size": 64}
    stages = {"classifier": small, "cams": {"scales": [1.0], "n_shards": 1}, "crf": {"n_shards": 1},
              "segmentation": seg}
    cfg = write_yaml(tmp_path / "tiny.yaml", {
        "datasets": {"toy": {"generator": gen, "stages": stages}, "toycoco": {"generator": gen, "stages": stages}},
        "experiments": {"rtc": {"datasets": {"toy": {"stages": {
            "classifier": {**small, "rtc": {"view2_size": 32, "seg_start": 0.5}}, "cams": {"scales": [1.0]},
            "single_stage": {"scales": [1.0], "n_shards": 1}, "segmentation": seg}}}}},
    })
    run_snakemake(tmp_path, "--cores", "2", "toy_rtc_report", "toycoco_cam_report", configfile=cfg)
    rtc = json.loads((tmp_path / "results/toy/reports/rtc/report.json").read_text())
    (ss,) = rtc["single_stage"]
    assert ss["experiment"] == "rtc" and ss["split"] == "val" and ss["threshold_source"]["split"] == "train"
    assert 0 <= ss["miou"] <= 1 and 0 <= ss["crf_miou"] <= 1 and len(ss["iou"]) == len(ss["crf_iou"]) == 6
    assert ss["two_stage_miou"] == rtc["rows"][0]["segmentation"]["miou"]
    assert rtc["rows"][0]["segmentation"]["path"].startswith("two-stage")
    assert rtc["refinement"][0]["refinement"] == "dense CRF of the method's own segmentation output"
    md = (tmp_path / "results/toy/reports/rtc/report.md").read_text()
    assert "## Single-stage output" in md and "single-stage + CRF mIoU" in md
    from wsss_core.store.shards import ShardedStore
    with ShardedStore(sorted((tmp_path / "results/toy/rtc/single_stage/maps/val").glob("*.h5")), kind="cams") as st:
        keys, maps = st[st.ids()[0]]
        assert keys.tolist() == [1, 2, 3, 4, 5] and maps.shape[0] == 5   # every class, gated by the scores
        assert st.attrs["gate"] == "scores"
    coco = json.loads((tmp_path / "results/toycoco/reports/cam/report.json").read_text())
    assert coco["dataset_info"]["n_classes"] == 81 and len(coco["per_class"]["classes"]) == 81
    assert coco["dataset_info"]["classes"][1:3] == ["person", "bicycle"]
    assert coco["dataset_info"]["splits"] == {"train": 16, "val": 8}   # 2 images per split without objects dropped
    dry = run_snakemake(tmp_path, "-n", "toy_rtc_report", "toycoco_cam_report", configfile=cfg)
    assert "Nothing to be done" in dry.stdout + dry.stderr
