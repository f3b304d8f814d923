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


def _resnet38_weights(workdir: Path) -> None:
    """A stand-in for the ResNet-38 ImageNet file at its configured (relative) path; a dry run only checks it exists."""
    (workdir / "weights").mkdir(exist_ok=True)
    (workdir / "weights" / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params").write_bytes(b"")


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
    assert proc.elapsed < 10, f"DAG took {proc.elapsed:.1f} s"
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


def test_voc_fsae_dag_shares_only_dataset_and_saliency_jobs(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    sal = tmp_path / "SALImages"
    sal.mkdir()
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": {"root": str(root), "saliency": {"dir": str(sal)}}}})
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg, check=False)
    assert proc.returncode != 0 and "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" in proc.stdout + proc.stderr
    assert "github.com/jiwoon-ahn/psa" in proc.stdout + proc.stderr  # says how to get it
    _resnet38_weights(tmp_path)
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg)
    assert proc.elapsed < 10, f"DAG took {proc.elapsed:.1f} s"
    jobs = _dry_run_jobs(proc.stdout)
    by_branch: dict[str, list[str]] = {"ppc": [], "ppc_fsae": [], "shared": []}
    for rule, outputs in jobs:
        branches = {b for o in outputs for b in ("ppc", "ppc_fsae") if f"/voc/{b}/" in o}
        assert len(branches) <= 1, (rule, outputs)
        by_branch[branches.pop() if branches else "shared"].append(rule)
    shared = sorted(by_branch["shared"])
    # dataset + saliency once each; the DeepLab ImageNet weights once; the report and its target
    assert shared == ["fetch_weights", "prepare_dataset", "report", "saliency", "voc_fsae_report"], shared
    # the two branches are the same pipeline, job for job, and nothing of one serves the other
    assert sorted(by_branch["ppc"]) == sorted(by_branch["ppc_fsae"])
    assert by_branch["ppc"].count("train_classifier") == 1
    assert by_branch["ppc"].count("infer_cams") == 16 and by_branch["ppc"].count("refine_crf") == 8
    assert by_branch["ppc"].count("test_submission") == 1 and by_branch["ppc"].count("infer_segmentation") == 16


def test_voc_fsae_without_saliency_folder_names_it(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    missing = tmp_path / "no_saliency"
    cfg = write_yaml(tmp_path / "voc.yaml", {"datasets": {"voc": {"root": str(root), "saliency": {"dir": str(missing)}}}})
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert str(missing) in out and "SALImages" in out


def test_affinity_refinement_replaces_the_crf_jobs(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    sal = tmp_path / "SALImages"
    sal.mkdir()
    cfg = write_yaml(tmp_path / "voc.yaml", {
        "datasets": {"voc": {"root": str(root), "saliency": {"dir": str(sal)}}},
        "experiments": {"ppc": {"stages": {"affinity": {"enabled": True}}}},
    })
    _resnet38_weights(tmp_path)
    proc = run_snakemake(tmp_path, "-n", "voc_fsae_report", configfile=cfg)
    jobs = _dry_run_jobs(proc.stdout)
    ppc = [r for r, outs in jobs if any("/voc/ppc/" in o for o in outs)]
    fsae = [r for r, outs in jobs if any("/voc/ppc_fsae/" in o for o in outs)]
    assert ppc.count("train_affinity") == 1 and ppc.count("random_walk") == 8 and "refine_crf" not in ppc
    assert "train_affinity" not in fsae and fsae.count("refine_crf") == 8
