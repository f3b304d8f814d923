"""The SLURM profile (profiles/slurm): resources it gives each rule (dry run, no SLURM needed), and a real
submission of a tiny toy pipeline to a single-node SLURM started by the test (tests/slurm_cluster.py; skips
without root / slurm-wlm / munge), whose report must equal a local run's."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from conftest import REPO, run_snakemake

PROFILE = REPO / "profiles" / "slurm"

TINY = REPO / "tests" / "configs" / "tiny_toy_cam.yaml"  # toy_cam_report, 12 jobs


def rule_names() -> dict[str, bool]:
    """Every rule of rules/*.smk -> whether it declares a ``gpu`` resource (``gpu=1`` or ``gpu=<function>``)."""
    rules = {}
    for f in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", f.read_text(), flags=re.M):
            m = re.match(r"rule (\w+):", block)
            if m:
                rules[m.group(1)] = bool(re.search(r"^\s+gpu=", block, re.M))
    return rules


def profile_set_resources() -> dict[str, dict]:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]


def resources_by_rule(dry_run_output: str) -> dict[str, str]:
    return dict(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", dry_run_output, re.M))


def test_slurm_profile_resources_dry_run(tmp_path, monkeypatch):
    """Partition from $WSSS_SLURM_PARTITION, per-rule runtime/memory as expressions of `attempt`, GPU rules keep
    gpu=1; the profile replaces profiles/default (latency-wait 60)."""
    monkeypatch.setenv("WSSS_SLURM_PARTITION", "gpu-part")
    monkeypatch.delenv("WSSS_SLURM_ACCOUNT", raising=False)
    dry = run_snakemake(tmp_path, "--workflow-profile", str(PROFILE), "-n", "toy_cam_report", configfile=TINY)
    out = dry.stdout + dry.stderr
    assert f"workflow specific profile {PROFILE}" in out
    res = resources_by_rule(out)
    assert {"train_classifier", "eval_cams", "train_segmentation", "report"} <= set(res), res
    for rule, r in res.items():
        if rule == "toy_cam_report":
            continue
        assert "slurm_partition=gpu-part" in r and "slurm_account" not in r, (rule, r)
    assert "runtime=1440" in res["train_classifier"] and "mem_mb=32000" in res["train_classifier"]
    assert re.search(r"\bgpu=[1-9]", res["train_classifier"]) and re.search(r"\bgpu=[1-9]", res["infer_cams"])
    assert re.search(r"\bruntime=60\b", res["eval_cams"]) and "mem_mb=8000" in res["eval_cams"]
    assert "gpu=" not in res["eval_cams"]
    gpu_rules = {r for r, g in rule_names().items() if g}
    assert gpu_rules <= set(profile_set_resources()), "every GPU rule has its runtime/memory in the profile"


@pytest.mark.slow
def test_toy_cam_report_through_slurm_equals_local_run(tmp_path, slurm_cluster, monkeypatch):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    remote.mkdir()
    run_snakemake(local, "--cores", "2", "toy_cam_report", configfile=TINY)

    # the shipped profile, with what a 2-CPU node without GPUs and accounting needs on top: partition, small
    # memory requests, gpu=0 for the GPU rules, squeue for job status, short first status check
    for k, v in {**slurm_cluster.env, "WSSS_SLURM_PARTITION": slurm_cluster.partition}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WSSS_SLURM_ACCOUNT", raising=False)
    overrides = {rule: dict(res) for rule, res in profile_set_resources().items()}  # keep the profile's runtimes
    for rule, gpu in rule_names().items():
        overrides.setdefault(rule, {})["mem_mb"] = 1000
        if gpu:
            overrides[rule]["gpu"] = 0
    set_resources = [f"{rule}:{k}={v}" for rule, res in overrides.items() for k, v in res.items()]
    # the target before --set-resources, which takes several values and would swallow it
    proc = run_snakemake(remote, "toy_cam_report", "--workflow-profile", str(PROFILE),
                         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                         "--latency-wait", "5", "--slurm-keep-successful-logs", "--set-resources", *set_resources, configfile=TINY, timeout=1500)
    log = proc.stdout + proc.stderr
    assert "has been submitted with SLURM jobid" in log

    # every job went through SLURM: one COMPLETED job per rule run, with the profile's time limits, no GPUs
    jobs = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%k|%T|%l|%b"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.splitlines()
    by_rule = {}
    for line in jobs:
        comment, state, limit, tres = line.split("|")
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", comment).group(1)
        by_rule.setdefault(rule, []).append((state, limit, tres))
    assert set(by_rule) == {"make_toy_dataset", "prepare_dataset", "train_classifier", "infer_cams", "eval_cams",
                            "refine_crf", "eval_pseudo_masks", "train_segmentation", "infer_segmentation",
                            "eval_segmentation", "report"}, by_rule
    assert all(state == "COMPLETED" and tres == "N/A" for js in by_rule.values() for state, _, tres in js), by_rule
    assert by_rule["train_classifier"][0][1] == "1-00:00:00"  # profile: 1440 * attempt minutes
    assert by_rule["train_segmentation"][0][1] == "2-00:00:00"
    assert by_rule["eval_cams"][0][1] == "1:00:00"  # default-resources: 60 * attempt
    slurm_logs = list((remote / "logs" / "slurm").rglob("*.log"))  # the profile's slurm-logdir
    assert len(slurm_logs) == sum(map(len, by_rule.values())), slurm_logs

    # the same numbers as the local run
    def numbers(root):
        rep = json.loads((root / "results/toy/reports/cam/report.json").read_text())
        rep.get("reproducibility", {}).pop("date_utc", None)
        return rep

    a, b = numbers(local), numbers(remote)
    assert a == b
    assert a["rows"][0]["cam"]["n_images"] == 8
    for f in ("cam/eval/cams.json", "cam/eval/pseudo_masks.json", "cam/eval/segmentation.json"):
        assert json.loads((local / "results/toy" / f).read_text()) == json.loads((remote / "results/toy" / f).read_text()), f
