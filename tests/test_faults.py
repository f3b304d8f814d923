"""Fault-injection suite (issue 6).

The toy pipeline (toy_cam_report on 24 + 12 + 12 images of 64 px) is SIGKILLed during classifier training, while
CAM shards are written (Snakemake itself, with its jobs), during CRF, during segmentation training and while the
report is written (Snakemake itself again), and rerun with ``--rerun-incomplete`` after each kill. Every time: the
killed job leaves no output that looks complete, finished shards are not recomputed (same inode and mtime), training
resumes from its checkpoint, and at the end every number, shard and weight equals an uninterrupted run's (CPU
determinism, compared exactly). A truncated shard, a shard of another split and a shard of another configuration are
detected when the DAG is built and rebuilt, and refused by the readers.

Faults come from the ``WSSS_FAULT`` test hook (wsss_core/faults.py: deterministic points) or from the test killing
Snakemake's process group.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import kill_group, run_snakemake, start_snakemake, write_yaml
from wsss_core.errors import DataError
from wsss_core.faults import parse
from wsss_core.store import ShardedStore, ShardWriter, read_json
from wsss_core.store.shards import SHARD_FIX, set_aside_invalid_shard, shard_problems

CFG = {"datasets": {"toy": {
    "generator": {"n_train_aug": 24, "n_train": 12, "n_val": 12, "image_size": 64},
    "stages": {"classifier": {"max_steps": 40, "checkpoint_every": 10, "batch_size": 4, "crop_size": 64,
                              "resize_long": [56, 72]},
               "cams": {"scales": [1.0], "n_shards": 3},
               "crf": {"n_shards": 2},
               "segmentation": {"max_steps": 12, "checkpoint_every": 5, "crop_size": 64, "batch_size": 4,
                                "n_shards": 1}},
}}}
TARGET = "toy_cam_report"
EXP = "results/toy/cam"
REPORT = "results/toy/reports/cam"


# ---------------------------------------------------------------- helpers


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def shards(root: Path) -> list[Path]:
    """Every final shard file of the experiment (CAMs, pseudo-masks, segmentation predictions)."""
    return sorted(p for p in (root / EXP).rglob("*-of-*.h5") if not p.name.startswith("."))


def stats(paths) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per path: a recomputed file (atomic write: a new inode) or a touched one shows."""
    return {str(p): (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


def temp_files(root: Path) -> list[Path]:
    return sorted((root / "results").rglob(".*.tmp-*"))


def jobs_run(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:"):]
    return {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if k != "total"}


def user_lines(output: str) -> str:
    """What a user reads after a fault (Snakemake's error lines), for the assertion messages."""
    keep = ("Error", "error", "ncomplete", "lock", "Exiting", "invalid shard", "shard(s)", "WSSS_FAULT", "died with",
            "Complete log")
    return "\n".join(line for line in output.splitlines()
                     if any(k in line for k in keep) and not line.lstrip().startswith("Command:"))


def shard_contents(path: Path) -> dict:
    with h5py.File(path, "r") as fh:
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in fh.attrs.items()}
        return {"attrs": attrs, "data": {i: {k: g[k][()] for k in g} for i, g in fh.items()}}


def assert_same_arrays(a: dict, b: dict, where: str) -> None:
    assert a["attrs"] == b["attrs"], where
    assert a["data"].keys() == b["data"].keys(), where
    for i in a["data"]:
        for k in a["data"][i]:
            x, y = a["data"][i][k], b["data"][i][k]
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{where}: {i}/{k} differs"


def final_numbers(root: Path) -> dict:
    out = {f: read_json(root / EXP / "eval" / f) for f in ("cams.json", "pseudo_masks.json", "segmentation.json")}
    report = read_json(root / REPORT / "report.json")
    report["reproducibility"].pop("date_utc")
    out["report.json"] = report
    return out


def assert_same_results(run: Path, reference: Path) -> None:
    """Metrics, report, every shard's contents and the trained weights equal the reference run's, exactly."""
    import torch

    assert final_numbers(run) == final_numbers(reference)
    names = [p.relative_to(run) for p in shards(run)]
    assert names == [p.relative_to(reference) for p in shards(reference)]
    for name in names:
        assert_same_arrays(shard_contents(run / name), shard_contents(reference / name), str(name))
    for model in ("classifier/model.pt", "segmentation/model.pt"):
        a = torch.load(run / EXP / model, map_location="cpu", weights_only=False)["model"]
        b = torch.load(reference / EXP / model, map_location="cpu", weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the same config."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_yaml(root / "faults.yaml", CFG)
    run_snakemake(root, "--cores", "2", TARGET, configfile=cfg)
    return root


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_killed_runs_resume_and_end_with_the_numbers_of_an_uninterrupted_run(tmp_path, reference):
    cfg = write_yaml(tmp_path / "faults.yaml", CFG)
    seen = {}

    def run(*args, fault=None, **kw):
        proc = run_snakemake(tmp_path, *args, configfile=cfg, check=False,
                             env={"WSSS_FAULT": fault} if fault else None, **kw)
        seen["snakemake " + " ".join(args) + (f"  [WSSS_FAULT={fault}]" if fault else "")] = user_lines(text(proc))
        return proc

    ckpt_cls = tmp_path / EXP / "classifier/state/checkpoints"
    cams = tmp_path / EXP / "cams"

    # 1. the classifier job is SIGKILLed after step 25 (checkpoints at 10 and 20)
    p = run("--cores", "2", TARGET, fault="train_step:25@classifier/state")
    assert p.returncode == 1 and "Error in rule train_classifier" in text(p), text(p)[-3000:]
    assert not (tmp_path / EXP / "classifier/model.pt").exists()
    assert sorted(c.name for c in ckpt_cls.glob("step_*.pt")) == ["step_00000010.pt", "step_00000020.pt"]
    assert "WSSS_FAULT" in (tmp_path / "logs/toy/cam/train_classifier.log").read_text()
    dataset = stats((tmp_path / "results/toy/dataset").iterdir())

    # 2. rerun; Snakemake itself (with its jobs) is SIGKILLed while the 3rd CAM shard is written
    proc = start_snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", TARGET, configfile=cfg,
                           output=tmp_path / "cams_run.txt")
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if len(list(cams.glob("*/*-of-3.h5"))) >= 2 and list(cams.glob("*/.*.tmp-*")):
                break
            assert proc.poll() is None, "snakemake ended before the 3rd CAM shard:\n" + \
                (tmp_path / "cams_run.txt").read_text()[-3000:]
            time.sleep(0.02)
    finally:
        kill_group(proc)
    log = (tmp_path / "logs/toy/cam/train_classifier.log").read_text()
    assert re.findall(r"resumed from checkpoint at step (\d+)", log) == ["20"], log
    assert (tmp_path / EXP / "classifier/model.pt").is_file()
    finished = stats(cams.glob("*/*-of-3.h5"))
    assert 2 <= len(finished) < 6, finished
    partial = [str(t.parent / t.name[1:].split(".tmp-")[0]) for t in cams.glob("*/.*.tmp-*")]
    assert partial and not set(partial) & set(finished), (partial, finished)  # killed mid-write: a temp file only
    for f in finished:  # every shard under its final name is complete: the killed one is only a temporary file
        assert not shard_problems(f), f
    assert stats((tmp_path / "results/toy/dataset").iterdir()) == dataset
    seen["snakemake --cores 2 --rerun-incomplete toy_cam_report  [the test SIGKILLs snakemake's process group "
         "while the 3rd CAM shard is written: the output just stops]"] = ""

    p = run("--cores", "2", TARGET)  # the user sees the lock left by the killed Snakemake
    assert p.returncode == 1 and "--unlock" in text(p), text(p)[-3000:]
    assert run("--unlock").returncode == 0

    # 3. rerun (keep going); the first CRF job is SIGKILLed at its 3rd image, the other CRF shard is made
    p = run("--cores", "2", "--rerun-incomplete", "--keep-going", TARGET, fault="shard_item:3@pseudo_masks/1-of-2")
    assert p.returncode == 1 and "Error in rule refine_crf" in text(p), text(p)[-3000:]
    assert jobs_run(text(p))["infer_cams"] == 6 - len(finished)  # the finished shards are not recomputed
    assert {k: v for k, v in stats(cams.glob("*/*-of-3.h5")).items() if k in finished} == finished
    assert len(list(cams.glob("*/*-of-3.h5"))) == 6 and not list(cams.rglob(".*.tmp-*"))  # the partial one removed
    masks = tmp_path / EXP / "pseudo_masks"
    assert (masks / "0-of-2.h5").is_file() and not (masks / "1-of-2.h5").exists()
    assert list(masks.glob(".1-of-2.h5.tmp-*")), "the killed job's partial shard stays a temporary file"
    assert "WSSS_FAULT" in (tmp_path / "logs/toy/cam/refine_crf/1-of-2.log").read_text()
    before = stats([*shards(tmp_path), tmp_path / EXP / "eval/cams.json"])

    # 4. rerun; the segmentation job is SIGKILLed after step 8 (checkpoint at 5)
    p = run("--cores", "2", "--rerun-incomplete", TARGET, fault="train_step:8@segmentation/state")
    assert p.returncode == 1 and "Error in rule train_segmentation" in text(p), text(p)[-3000:]
    assert jobs_run(text(p)).get("refine_crf") == 1 and not temp_files(tmp_path)
    assert stats(before) == before
    assert not (tmp_path / EXP / "segmentation/model.pt").exists()
    before = stats([*shards(tmp_path), tmp_path / EXP / "eval/cams.json"])

    # 5. rerun; Snakemake (with the report job) is SIGKILLed after 2 of the report's 6 files are written
    p = run("--cores", "2", "--rerun-incomplete", TARGET, fault="report_write:2!group", new_session=True)
    assert p.returncode == -9, text(p)[-3000:]
    log = (tmp_path / "logs/toy/cam/train_segmentation.log").read_text()
    assert re.findall(r"resumed from checkpoint at step (\d+)", log) == ["5"], log
    written = sorted(f.name for f in (tmp_path / REPORT).iterdir() if not f.name.startswith("."))
    assert written == ["per_class_iou.png", "threshold_curves.png"], written
    assert stats(before) == before
    before = stats([*shards(tmp_path), tmp_path / EXP / "eval/cams.json", tmp_path / EXP / "eval/segmentation.json"])

    assert run("--unlock").returncode == 0
    # without the workflow profile (which sets rerun-incomplete) Snakemake refuses the report's 2 written files
    p = run("--workflow-profile", "none", "--cores", "2", TARGET)
    assert p.returncode == 1 and "seem to be incomplete" in text(p) and "--rerun-incomplete" in text(p), text(p)[-3000:]
    assert "threshold_curves.png" in text(p)

    # 6. the last rerun completes, redoing the report only
    p = run("--cores", "2", "--rerun-incomplete", TARGET)
    assert p.returncode == 0, text(p)[-3000:]
    assert jobs_run(text(p)) == {"report": 1, TARGET: 1}
    assert "reason: Forced execution" in text(p)  # --rerun-incomplete forces the job of the incomplete files
    assert stats(before) == before and not temp_files(tmp_path)
    assert not list((tmp_path / ".snakemake/locks").glob("*"))
    print("\n\n".join(f"$ {k}\n{v}" for k, v in seen.items()))  # what the user sees (pytest -s)
    assert_same_results(tmp_path, reference)


@pytest.mark.slow
def test_truncated_and_foreign_shards_are_set_aside_and_rebuilt(tmp_path, reference):
    root = tmp_path / "run"
    shutil.copytree(reference, root, symlinks=True)  # copy2: mtimes kept, Snakemake sees an up-to-date run
    cfg = root / "faults.yaml"
    cams = root / EXP / "cams"
    truncated, foreign_split, foreign_config = (cams / "train_aug/0-of-3.h5", cams / "val/2-of-3.h5",
                                                cams / "train_aug/1-of-3.h5")
    size = truncated.stat().st_size
    with open(truncated, "r+b") as fh:
        fh.truncate(size // 2)
    shutil.copy2(cams / "train_aug/2-of-3.h5", foreign_split)  # a shard of another split, same name
    with h5py.File(foreign_config, "a") as fh:  # a shard made with other settings
        fh.attrs["config_hash"] = "0123456789ab"
    untouched = stats([cams / "train_aug/2-of-3.h5", cams / "val/0-of-3.h5", cams / "val/1-of-3.h5"])
    corrupt = stats([truncated, foreign_split, foreign_config])

    dry = run_snakemake(root, "-n", TARGET, configfile=cfg)
    assert "dry run: left as it is" in text(dry) and stats(corrupt) == corrupt
    assert not list(cams.glob("*/*.invalid-*"))

    p = run_snakemake(root, "--cores", "2", TARGET, configfile=cfg)
    out = text(p)
    print(user_lines(out))
    assert f"invalid shard: HDF5 shard {truncated.relative_to(root)}: it cannot be read as HDF5: it is truncated" in out
    assert f"HDF5 shard {foreign_split.relative_to(root)}: it holds split 'train_aug', expected 'val'" in out
    assert "1 shard(s) were made with other settings" in out and str(foreign_config.relative_to(root)) in out
    jobs = jobs_run(out)
    assert jobs["infer_cams"] == 3 and "train_classifier" not in jobs, jobs  # only those shards, then downstream
    assert {"eval_cams", "refine_crf", "train_segmentation", "report"} <= set(jobs)
    assert stats(untouched) == untouched
    (aside_t,) = cams.glob("train_aug/0-of-3.h5.invalid-*")
    (aside_f,) = cams.glob("val/2-of-3.h5.invalid-*")
    assert aside_t.stat().st_size == size // 2 and aside_f.stat().st_size == (cams / "train_aug/2-of-3.h5").stat().st_size
    assert not list(cams.glob("train_aug/1-of-3.h5.invalid-*"))  # out of date: replaced like after a config change
    for f in (truncated, foreign_split, foreign_config):
        assert not shard_problems(f), f
    assert_same_results(root, reference)


# ---------------------------------------------------------------- the hook and the checks, without Snakemake


def test_fault_spec_parsing():
    assert parse("train_step:25@classifier/state") == [("train_step", 25, "classifier/state", False)]
    assert parse("report_write:2!group, shard_item:3") == [("report_write", 2, "", True), ("shard_item", 3, "", False)]
    with pytest.raises(ValueError, match="WSSS_FAULT"):
        parse("train_step")


def _write_shard(path: Path, n: int, env: dict) -> subprocess.CompletedProcess:
    code = ("import sys, numpy as np\nfrom wsss_core.store import ShardWriter\n"
            f"with ShardWriter(sys.argv[1], 'masks', {{'split': 'val', 'shard': 0, 'n_shards': 1}}) as w:\n"
            f"    for i in range({n}):\n        w.add_mask(f'img{{i}}', np.full((4, 4), i, np.uint8))\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_fault_point_sigkills_a_shard_writer_mid_shard_and_the_next_writer_cleans_up(tmp_path):
    path = tmp_path / "masks" / "0-of-1.h5"
    p = _write_shard(path, 5, {"WSSS_FAULT": "shard_item:3@masks/0-of-1.h5"})
    assert p.returncode == -9 and "SIGKILL of this process" in p.stderr, p.stderr
    assert not path.exists() and len(list(path.parent.glob(".0-of-1.h5.tmp-*"))) == 1
    p = _write_shard(path, 5, {"WSSS_FAULT": "shard_item:3@elsewhere.h5"})  # another shard: no effect
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in path.parent.iterdir()) == ["0-of-1.h5"]  # the killed writer's temp file is gone
    with ShardedStore([path], kind="masks", expect={"split": "val"}) as store:
        assert store.ids() == [f"img{i}" for i in range(5)]


def _cam_shard(path: Path, split: str, shard: int, n: int, config_hash: str = "abc", ids=("a", "b")) -> Path:
    with ShardWriter(path, "cams", {"split": split, "shard": shard, "n_shards": n, "config_hash": config_hash}) as w:
        for i in ids:
            w.add_cams(f"{split}_{shard}_{i}", np.array([1]), np.ones((1, 3, 3)))
    return path


def test_shard_checks_find_truncated_foreign_and_stale_shards(tmp_path):
    expect = {"kind": "cams", "split": "val", "config_hash": "abc"}
    good = _cam_shard(tmp_path / "val" / "0-of-2.h5", "val", 0, 2)
    assert shard_problems(good, expect) == [] and set_aside_invalid_shard(good, expect) is None
    assert set_aside_invalid_shard(tmp_path / "val" / "absent.h5", expect) is None

    truncated = _cam_shard(tmp_path / "t" / "1-of-2.h5", "val", 1, 2)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    assert [p.key for p in shard_problems(truncated, expect)] == ["unreadable"]
    assert "truncated" in shard_problems(truncated, expect)[0].message
    assert [p.key for p in shard_problems(_cam_shard(tmp_path / "s" / "1-of-2.h5", "train", 1, 2), expect)] == ["split"]
    assert [p.key for p in shard_problems(_cam_shard(tmp_path / "n" / "1-of-2.h5", "val", 0, 2), expect)] == ["name"]
    with h5py.File(tmp_path / "n" / "1-of-2.h5", "a") as fh:
        fh.attrs["n_images"] = 7
    assert {p.key for p in shard_problems(tmp_path / "n" / "1-of-2.h5", expect)} == {"name", "n_images"}

    # dry run: reported, left as it is
    action, msg = set_aside_invalid_shard(truncated, expect, dry_run=True)
    assert action == "set aside" and "dry run" in msg and truncated.exists()
    # invalid: renamed (bytes kept), so that the rule that makes it runs again
    size = truncated.stat().st_size
    action, msg = set_aside_invalid_shard(truncated, expect)
    (aside,) = truncated.parent.glob("1-of-2.h5.invalid-*")
    assert action == "set aside" and not truncated.exists() and aside.stat().st_size == size
    assert str(truncated) in msg and aside.name in msg
    # valid but made with other settings: marked out of date (mtime 1970), not copied
    stale = _cam_shard(tmp_path / "c" / "0-of-2.h5", "val", 0, 2, config_hash="other")
    action, msg = set_aside_invalid_shard(stale, expect)
    assert action == "out of date" and stale.stat().st_mtime == 0 and "expected 'abc'" in msg
    assert sorted(x.name for x in stale.parent.iterdir()) == ["0-of-2.h5"]


def test_store_refuses_truncated_and_foreign_shards_naming_the_file_and_the_fix(tmp_path):
    a = _cam_shard(tmp_path / "val" / "0-of-2.h5", "val", 0, 2)
    b = _cam_shard(tmp_path / "val" / "1-of-2.h5", "val", 1, 2)
    with ShardedStore([a, b], kind="cams", expect={"split": "val", "config_hash": "abc"}) as store:
        assert len(store) == 4

    truncated = tmp_path / "t" / "1-of-2.h5"
    truncated.parent.mkdir()
    truncated.write_bytes(b.read_bytes()[:1000])
    with pytest.raises(DataError) as e:
        ShardedStore([a, truncated])
    assert str(truncated) in str(e.value) and "truncated" in str(e.value) and SHARD_FIX in str(e.value)

    # a shard of another split, or of another configuration, among the shards of a folder: named
    for name, kw in (("split", {"split": "train"}), ("config_hash", {"config_hash": "xyz"})):
        folder = tmp_path / name
        shards = [_cam_shard(folder / f"{k}-of-3.h5", "val", k, 3) for k in range(3)]
        _cam_shard(shards[2], **{"split": "val", "shard": 2, "n": 3, **kw})
        with pytest.raises(DataError) as e:
            ShardedStore(shards)
        assert str(shards[2]) in str(e.value) and f"other shards of {folder}" in str(e.value), str(e.value)
        assert SHARD_FIX in str(e.value)
    # what the reader expects: kind, split, config hash
    with pytest.raises(DataError, match="holds split 'val', expected 'train'"):
        ShardedStore([a], expect={"split": "train"})
    with pytest.raises(DataError, match="holds kind 'cams', expected 'masks'"):
        ShardedStore([a], kind="masks")
    # a shard renamed to another shard's name
    with pytest.raises(DataError, match="file name 1-of-2.h5 says 1"):
        ShardedStore([_cam_shard(tmp_path / "r" / "1-of-2.h5", "val", 0, 2)])
