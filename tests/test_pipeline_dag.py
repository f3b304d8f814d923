"""DAG-level checks: dry runs on a VOC-shaped tree of the real id lists, config validation, missing data."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO, run_snakemake, shared_path, write_yaml


def _voc_tree(root: Path) -> Path:
    lists = shared_path("data", "voc12_lists")
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for d in ("JPEGImages", "SegmentationClassAug", "Annotations"):
        (root / d).mkdir()
    for src, dst in (("trainaug_voc.txt", "train_aug.txt"), ("train_voc.txt", "train.txt"), ("val_voc.txt", "val.txt"),
                     ("test.txt", "test.txt")):
        (seg / dst).write_text((lists / src).read_text())
    return root


def _voc_datasets(tmp_path: Path) -> dict:
    """The config's ``datasets``: ``voc`` on a VOC-shaped tree of the real id lists, with an (empty) saliency folder."""
    sal = tmp_path / "SALImages"
    sal.mkdir()
    return {"voc": {"root": str(_voc_tree(tmp_path / "VOC2012")), "saliency": {"dir": str(sal)}}}


DEIT = "deit_small_patch16_224-cd65a155.pth"  # MCTformer's DeiT-S file name


def _resnet38_weights(workdir: Path, deit: bool = True) -> None:
    """Stand-ins for the local weights files at their configured (relative) paths (ResNet-38 ImageNet .params; DeiT-S
    for MCTformer unless ``deit`` is False); a dry run only checks that they exist."""
    (workdir / "weights").mkdir(exist_ok=True)
    (workdir / "weights" / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params").write_bytes(b"")
    if deit:
        (workdir / "weights" / DEIT).write_bytes(b"")


def _job_counts(stdout: str) -> dict[str, int]:
    table = stdout[stdout.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_voc_dry_run_on_real_id_lists_is_fast(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": {"root": str(root)}}})
    n_lines = {s: len((root / "ImageSets/Segmentation" / f"{s}.txt").read_text().split("\n")) - 1
               for s in ("train_aug", "train", "val")}
    assert n_lines == {"train_aug": 10582, "train": 1464, "val": 1449}
    proc = run_snakemake(tmp_path, "-n", "voc_cam_report", configfile=cfg)
    assert proc.elapsed < 60, f"DAG took {proc.elapsed:.1f} s"  # gross-regression guard; timings: bench/
    counts = _job_counts(proc.stdout)
    shards = 8
    assert counts["prepare_dataset"] == 1
    assert counts["train_classifier"] == 1
    assert counts["infer_cams"] == 2 * shards  # train_aug and val
    assert counts["refine_crf"] == shards
    assert counts["infer_segmentation"] == 2 * shards  # val and the VOC2012 test split
    assert counts["test_submission"] == 1
    assert counts["fetch_weights"] == 2  # ResNet-50 (classifier) and ResNet-101 (DeepLab) ImageNet weights
    assert counts["report"] == 1
    assert "make_toy_dataset" not in counts


def test_missing_voc_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "VOC2012"
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": {"root": str(missing)}}})
    proc = run_snakemake(tmp_path, "-n", "voc_cam_report", configfile=cfg, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert str(missing) in out
    assert "VOCtrainval_11-May-2012" in out  # says how to get it
    assert not (tmp_path / "results").exists()


def test_missing_voc_list_names_the_list(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    (root / "ImageSets/Segmentation/train_aug.txt").unlink()
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": {"root": str(root)}}})
    proc = run_snakemake(tmp_path, "-n", "voc_cam_report", configfile=cfg, check=False)
    assert proc.returncode != 0
    assert "train_aug.txt" in proc.stdout + proc.stderr


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    cfg = write_yaml(tmp_path / "typo.yaml", {"stages": {"crf": {"bg_treshold": 0.3}}})
    proc = run_snakemake(tmp_path, "-n", "toy_cam_report", configfile=cfg, check=False)
    assert proc.returncode != 0
    assert "bg_treshold" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean(tmp_path):
    proc = run_snakemake(REPO, "--lint")
    assert "Lints for" not in proc.stdout + proc.stderr


def _dry_run_jobs(stdout: str) -> list[tuple[str, list[str]]]:
    """(rule, output files) of every job of a ``snakemake -n`` printout."""
    jobs = []
    for block in re.split(r"\n(?=(?:localrule|rule) \w+:)", stdout):
        m = re.match(r"(?:localrule|rule) (\w+):", block)
        if not m:
            continue
        out = re.search(r"^\s+output: (.*)$", block, re.M)
        jobs.append((m.group(1), [s.strip() for s in out.group(1).split(",")] if out else []))
    return jobs


def _unique_jobs(stdout: str):
    """The dry run's jobs (asserting that no output is made twice) and ``count(rule, experiment)``."""
    jobs = _dry_run_jobs(stdout)
    outputs = [o for _, outs in jobs for o in outs]
    assert len(outputs) == len(set(outputs))  # no output is made twice

    def count(rule: str, exp: str) -> int:
        return sum(1 for r, outs in jobs if r == rule and any(f"/voc/{exp}/" in o for o in outs))
    return jobs, count


def test_voc_fsae_dag_shares_only_dataset_and_saliency_jobs(tmp_path):
    datasets = _voc_datasets(tmp_path)
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": datasets})
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg, check=False)
    assert proc.returncode != 0 and "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" in proc.stdout + proc.stderr
    assert "github.com/jiwoon-ahn/psa" in proc.stdout + proc.stderr  # says how to get it
    _resnet38_weights(tmp_path)
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg)
    assert proc.elapsed < 60, f"DAG took {proc.elapsed:.1f} s"  # gross-regression guard; timings: bench/
    jobs = _dry_run_jobs(proc.stdout)
    branches_of = ("ppc", "ppc_fsae", "sipe", "sipe_fsae", "mctformer", "mctformer_fsae")
    by_branch: dict[str, list[str]] = {b: [] for b in branches_of + ("shared",)}
    for rule, outputs in jobs:
        branches = {b for o in outputs for b in branches_of if f"/voc/{b}/" in o}
        assert len(branches) <= 1, (rule, outputs)
        by_branch[branches.pop() if branches else "shared"].append(rule)
    shared = sorted(by_branch["shared"])
    # dataset + saliency once each; the ImageNet weights once per file (ResNet-50 for SIPE and IRN, ResNet-101
    # for DeepLab); the report and its target
    assert shared == ["fetch_url_weights", "fetch_weights", "fetch_weights", "prepare_dataset", "report", "saliency",
                      "voc_fsae_report"], shared  # + DeiT-S (MCTformer) by URL, once for both MCTformer branches
    # base and base + FSAE are the same pipeline, job for job, and nothing of one serves the other
    assert sorted(by_branch["ppc"]) == sorted(by_branch["ppc_fsae"])
    assert sorted(by_branch["sipe"]) == sorted(by_branch["sipe_fsae"])
    assert by_branch["ppc"].count("train_classifier") == 1
    assert by_branch["ppc"].count("infer_cams") == 16 and by_branch["ppc"].count("refine_crf") == 8
    assert by_branch["ppc"].count("test_submission") == 1 and by_branch["ppc"].count("infer_segmentation") == 16
    sipe = by_branch["sipe"]
    assert sipe.count("train_classifier") == 1 and sipe.count("infer_cams") == 16
    assert sipe.count("cam_to_ir_label") == 8 and sipe.count("train_irn") == 1
    assert sipe.count("make_sem_seg_labels") == 8 and sipe.count("eval_sem_seg") == 1
    assert "refine_crf" not in sipe and "train_affinity" not in sipe
    assert sorted(by_branch["mctformer"]) == sorted(by_branch["mctformer_fsae"])
    mct = by_branch["mctformer"]
    assert mct.count("train_classifier") == 1 and mct.count("infer_cams") == 16 and mct.count("eval_cams") == 1
    assert mct.count("train_affinity") == 1 and mct.count("random_walk") == 8 and "refine_crf" not in mct
    assert "train_irn" not in mct and mct.count("train_segmentation") == 1


def test_voc_mctformer_branch_is_shared_by_its_report_and_the_fsae_report(tmp_path):
    """voc_mctformer_report (V1, V2) with voc_fsae_report: the V2 branch is built once for both, the DeiT-S file is
    fetched once by URL; a local weights.path that is missing is named with the download address."""
    datasets = _voc_datasets(tmp_path)
    local = {"stages": {"classifier": {"backbone": {"weights": {"path": f"weights/{DEIT}"}}}}}
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": datasets,
                                            "experiments": {"mctformer_v1": local}})
    _resnet38_weights(tmp_path, deit=False)
    proc = run_snakemake(tmp_path, "-n", "voc_mctformer_report", configfile=cfg, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and DEIT in out and "dl.fbaipublicfiles.com/deit" in out
    cfg = write_yaml(tmp_path / "voc2.yaml", {"datasets": datasets})
    proc = run_snakemake(tmp_path, "-n", "voc_mctformer_report", "voc_fsae_report", configfile=cfg)
    assert proc.elapsed < 60, f"DAG took {proc.elapsed:.1f} s"  # gross-regression guard; timings: bench/
    jobs, count = _unique_jobs(proc.stdout)
    for exp in ("mctformer_v1", "mctformer", "mctformer_fsae"):
        assert count("train_classifier", exp) == 1 and count("train_affinity", exp) == 1, exp
        assert count("random_walk", exp) == 8 and count("train_segmentation", exp) == 1, exp
    rules = [r for r, _ in jobs]
    assert rules.count("prepare_dataset") == 1 and rules.count("report") == 2
    (deit,) = [o for r, outs in jobs if r == "fetch_url_weights" for o in outs]
    assert deit.endswith(f"weights/url/{DEIT}")
    reports = sorted(o for r, outs in jobs if r == "report" for o in outs if o.endswith("report.md"))
    assert [Path(p).parent.name for p in reports] == ["fsae", "mctformer"]


def test_voc_sipe_sfc_and_fsae_reports_share_the_sipe_branch(tmp_path):
    """One run of the three VOC reports: the SIPE branch (classifier, CAMs, IRN, DeepLab) is built once and
    serves both the `sipe` and the `fsae` suites; SFC and SIPE + FSAE are branches of their own."""
    datasets = _voc_datasets(tmp_path)
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": datasets})
    _resnet38_weights(tmp_path)
    proc = run_snakemake(tmp_path, "-n", "voc_sipe_report", "voc_sfc_report", "voc_fsae_report", configfile=cfg)
    jobs, count = _unique_jobs(proc.stdout)
    for exp in ("sipe", "sfc", "sipe_fsae"):
        assert count("train_classifier", exp) == 1 and count("train_irn", exp) == 1, exp
        assert count("make_sem_seg_labels", exp) == 8 and count("train_segmentation", exp) == 1, exp
    rules = [r for r, _ in jobs]
    assert rules.count("prepare_dataset") == 1 and rules.count("report") == 3
    assert rules.count("fetch_weights") == 2
    reports = sorted(o for r, outs in jobs if r == "report" for o in outs if o.endswith("report.md"))
    assert [Path(p).parent.name for p in reports] == ["fsae", "sfc", "sipe"]


def test_voc_fsae_without_saliency_folder_names_it(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    missing = tmp_path / "no_saliency"
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": {"root": str(root), "saliency": {"dir": str(missing)}}}})
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert str(missing) in out and "SALImages" in out


def test_affinity_refinement_replaces_the_crf_jobs(tmp_path):
    datasets = _voc_datasets(tmp_path)
    cfg = write_yaml(tmp_path / "voc.yaml", {
        "datasets": datasets,
        "experiments": {"ppc": {"refine": "affinity"}, "ppc_fsae": {"refine": "crf"}},  # ppc_fsae extends ppc
    })
    _resnet38_weights(tmp_path)
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg)
    jobs = _dry_run_jobs(proc.stdout)
    ppc = [r for r, outs in jobs if any("/voc/ppc/" in o for o in outs)]
    fsae = [r for r, outs in jobs if any("/voc/ppc_fsae/" in o for o in outs)]
    assert ppc.count("train_affinity") == 1 and ppc.count("random_walk") == 8 and "refine_crf" not in ppc
    assert "train_affinity" not in fsae and fsae.count("refine_crf") == 8


def test_every_toy_stage_is_cpu_sized():
    """No experiment's full-scale schedule leaks into the toy dataset (experiment settings override dataset ones,
    so a VOC max_steps at experiment level needs a toy override under experiments.E.datasets.toy)."""
    import yaml

    from wsss_core.config import STAGES, stage_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    owners = [(exp, stage) for exp in config["experiments"] for stage in STAGES if stage != "scn"]
    owners += [(net, "scn") for net in config["superpixel_networks"]]
    for owner, stage in owners:
        cfg = stage_config(config, "toy", owner, stage)
        assert cfg.get("max_steps", 0) <= 1200, (owner, stage, cfg.get("max_steps"))
        assert cfg.get("crop_size", 0) <= 96, (owner, stage, cfg.get("crop_size"))
        assert not (cfg.get("backbone") or cfg).get("weights"), (owner, stage, "pretrained weights on toy data")


def test_unknown_method_or_fsae_base_or_parent_is_an_error_naming_it(tmp_path):
    """Methods are checked against the registry when the workflow starts (no torch import): the message names the
    key and the closest registered name; an `extends` cycle is named too."""
    for exp, want in (({"method": "sipee"}, "experiments.sipe.method: unknown method 'sipee'; did you mean 'sipe'"),
                      ({"stages": {"classifier": {"fsae": {"base": "ppcc"}}}},
                       "experiments.sipe.stages.classifier.fsae.base (dataset toy): unknown method 'ppcc'"),
                      ({"extends": "sfc"}, "cycle: sipe -> sfc -> sipe")):
        cfg = write_yaml(tmp_path / "bad.yaml", {"experiments": {"sipe": exp}})
        proc = run_snakemake(tmp_path, "-n", "toy_cam_report", configfile=cfg, check=False)
        assert proc.returncode != 0 and want in proc.stdout + proc.stderr, (want, proc.stderr[-2000:])
    assert not (tmp_path / "results").exists()


def test_voc_superpixel_suites_dry_run(tmp_path):
    """voc_spcam_report and voc_msa_report on the real id lists: missing network / backbone files are named with where
    to get them; then the DAG: SP-CAM's stage 1, the (walk, threshold) grid, the shipped Q network (train_all.sh's
    quirk: no train_scn for SP-CAM unless scn: trained), MSA's network trained once for both MSA rows."""
    datasets = _voc_datasets(tmp_path)
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": datasets})
    proc = run_snakemake(tmp_path, "-n", "voc_spcam_report", configfile=cfg, check=False)
    assert proc.returncode != 0 and "resnest50-528c19ca.pth" in proc.stdout + proc.stderr
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnest50-528c19ca.pth").write_bytes(b"")
    proc = run_snakemake(tmp_path, "-n", "voc_spcam_report", configfile=cfg, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Q_model_final.pth" in text and "CHENDL-SHEN/ESC" in text
    (tmp_path / "weights" / "Q_model_final.pth").write_bytes(b"")
    proc = run_snakemake(tmp_path, "-n", "voc_spcam_report", "voc_msa_report", configfile=cfg)
    assert proc.elapsed < 60, f"DAG took {proc.elapsed:.1f} s"  # gross-regression guard; timings: bench/
    jobs, count = _unique_jobs(proc.stdout)
    rules = [r for r, _ in jobs]
    for e in ("spcam_eps", "spcam", "msa_image", "msa_sal"):
        assert count("train_classifier", e) == 1 and count("infer_cams", e) == 16, e
        assert count("threshold_masks", e) == 8 and count("refine_crf", e) == 0, e
    assert count("rw_grid", "spcam") == 1 and count("rw_grid", "msa_image") == 0
    assert rules.count("train_scn") == 1 and rules.count("eval_superpixels") == 1   # MSA's, shared by both rows
    scn_out = [o for r, outs in jobs if r == "train_scn" for o in outs]
    assert scn_out == [str(Path("results/voc/superpixels/msa/model.pt"))]
    # the switch: SP-CAM with the network its stage 2 trains, labelled by stage 1's train_aug CAMs
    cfg2 = write_yaml(tmp_path / "voc2.yaml", {
        "datasets": datasets,
        "experiments": {"spcam": {"stages": {"classifier": {"superpixels": {"scn": "trained"}}}}}})
    (tmp_path / "weights" / "SpixelNet_bsd_ckpt.tar").write_bytes(b"")
    proc = run_snakemake(tmp_path, "-n", "voc_spcam_report", configfile=cfg2)
    jobs, _ = _unique_jobs(proc.stdout)
    assert [o for r, outs in jobs if r == "train_scn" for o in outs] == [
        str(Path("results/voc/superpixels/spcam/model.pt"))]


def test_voc_rtc_dry_run_single_stage_and_two_stage_paths(tmp_path):
    """voc_rtc_report on the real id lists: the single-stage maps on train (the threshold split), val (the eval split)
    and train_aug (the two-stage pseudo-masks), one curve, CRF labels of val and train_aug, DeepLab on the latter;
    the ppcrtc suite shares RTC's branch."""
    datasets = _voc_datasets(tmp_path)
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": datasets})
    _resnet38_weights(tmp_path, deit=False)
    proc = run_snakemake(tmp_path, "-n", "voc_rtc_report", "voc_ppcrtc_report", configfile=cfg)
    assert proc.elapsed < 60, f"DAG took {proc.elapsed:.1f} s"  # gross-regression guard; timings: bench/
    jobs, count = _unique_jobs(proc.stdout)
    assert count("train_classifier", "rtc") == 1 and count("infer_cams", "rtc") == 16
    assert count("infer_single_stage", "rtc") == 24                       # train, val, train_aug x 8 shards
    assert count("eval_single_stage", "rtc") == 1 and count("eval_single_stage_crf", "rtc") == 1
    assert count("single_stage_crf", "rtc") == 8 and count("single_stage_masks", "rtc") == 8
    assert count("refine_crf", "rtc") == 0 and count("train_segmentation", "rtc") == 1
    assert count("infer_single_stage", "ppc") == 0 and count("refine_crf", "ppc") == 8
    maps = sorted({o.split("/maps/")[1].split("/")[0] for r, outs in jobs if r == "infer_single_stage" for o in outs})
    assert maps == ["train", "train_aug", "val"]
    masks = [o for r, outs in jobs if r == "single_stage_masks" for o in outs]
    assert all("/voc/rtc/pseudo_masks_single_stage/" in m for m in masks)
    assert [r for r, _ in jobs].count("report") == 2
