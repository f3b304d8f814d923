"""Item 5, workflow overhead: wall time of ``snakemake -n`` (DAG build) at VOC and COCO scale, and of the no-op
rerun of a finished toy run.

- VOC: a VOC-format tree with the real id lists (train_aug 10,582, train 1,464, val 1,449, test 1,456 from
  ../shared; the tarball's names or generated ids when absent), target ``voc_cam_report``.
- COCO: a COCO-shaped tree (``wsss_core.data.coco.write_placeholder_tree``: empty images and instances files) of
  the real COCO 2014 ids (train 82,081, val 40,137), target ``coco_cam_report``.
- toy no-op: a tiny toy configuration (16 train_aug images of 64 px, 10 steps, one shard per stage) run once to the
  end (untimed; its time is reported), then the same command again, which must do nothing ("Nothing to be done").

The goals are absolute (no reference workflow exists: the reference code is a sequence of scripts); each is the best
of ``--reps`` runs. A dry run that fails, a DAG without the expected jobs, or a rerun that does work exits 1.

    python bench/bench_workflow.py [--reps 2] [--skip-toy]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import COCO_LISTS, MASK_TARBALL, REPO, result, voc_ids, write_result

from wsss_core.data.coco import write_placeholder_tree

TINY = REPO / "tests" / "configs" / "tiny_toy_cam.yaml"  # the SLURM test's tiny toy_cam_report


def snakemake(workdir: Path, *args: str, configfile: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           *args]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"FAIL: snakemake {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return dt, proc


def voc_tree(root: Path, lists: dict[str, list[str]]) -> Path:
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for d in ("JPEGImages", "SegmentationClassAug", "Annotations"):
        (root / d).mkdir()
    for name, ids in lists.items():
        (seg / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def voc_lists() -> tuple[dict[str, list[str]], str]:
    got = {k: voc_ids(v) for k, v in (("train_aug", "trainaug_voc"), ("train", "train_voc"), ("val", "val_voc"),
                                      ("test", "test"))}
    if all(v is not None for v in got.values()):
        return got, "real VOC 2012 id lists (../shared/data/voc12_lists)"
    if MASK_TARBALL.is_file():
        import tarfile

        with tarfile.open(MASK_TARBALL) as tar:
            names = sorted(Path(m.name).stem for m in tar.getmembers() if m.name.endswith(".png"))
        return ({"train_aug": names[:10582], "train": names[:1464], "val": names[-1449:],
                 "test": [f"2008_{i:06d}" for i in range(1456)]}, "VOC mask names of the tarball (no id lists)")
    gen = [f"2008_{i:06d}" for i in range(12031)]
    return ({"train_aug": gen[:10582], "train": gen[:1464], "val": gen[-1449:], "test": gen[:1456]},
            "generated VOC-sized id lists (../shared absent)")


def coco_lists() -> tuple[dict[str, list[str]], str]:
    def read(name):
        p = COCO_LISTS / name
        return [s.strip() for s in p.read_text().splitlines() if s.strip()] if p.is_file() else None

    tr, va = read("train_coco.txt"), read("val_coco.txt")
    if tr and va:
        return {"train_aug": tr, "train": tr, "val": va}, "real COCO 2014 id lists (../shared/data/coco14_lists)"
    return ({"train_aug": [f"COCO_train2014_{i:012d}" for i in range(82081)],
             "train": [f"COCO_train2014_{i:012d}" for i in range(82081)],
             "val": [f"COCO_val2014_{i:012d}" for i in range(40137)]}, "generated COCO-sized id lists")


def dry_run(tmp: Path, name: str, cfg: dict, target: str, reps: int) -> tuple[float, list[float], int]:
    work = tmp / f"work_{name}"
    work.mkdir()
    cfgfile = tmp / f"{name}.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    times, n_jobs = [], 0
    for _ in range(reps):
        dt, proc = snakemake(work, "-n", target, configfile=cfgfile)
        times.append(dt)
        table = proc.stdout[proc.stdout.index("Job stats:"):] if "Job stats:" in proc.stdout else ""
        total = [int(line.split()[1]) for line in table.splitlines() if line.startswith("total")]
        n_jobs = total[0] if total else 0
        if "infer_cams" not in proc.stdout or not n_jobs:
            raise SystemExit(f"FAIL: the {name} dry run has no infer_cams jobs:\n{proc.stdout[-2000:]}")
    return min(times), times, n_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-toy", action="store_true", help="skip the toy run and its no-op rerun")
    args = ap.parse_args(argv)
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lists, vsrc = voc_lists()
        root = voc_tree(tmp / "VOC2012", lists)
        t, times, jobs = dry_run(tmp, "voc", {"datasets": {"voc": {"root": str(root)}}}, "voc_cam_report", args.reps)
        print(f"VOC dry run: {t:.1f} s ({jobs} jobs, {len(lists['train_aug'])} train_aug ids)")
        recs.append(_rec("5a", f"Workflow: snakemake -n, VOC ({len(lists['train_aug']):,} train_aug ids)", 10, t,
                         times, {"jobs": jobs, "ids": {k: len(v) for k, v in lists.items()}}, vsrc))

        clists, csrc = coco_lists()
        croot = tmp / "COCO"
        write_placeholder_tree(croot, {"train": clists["train"], "val": clists["val"]})
        coco = {"root": str(croot), "saliency": {"dir": str(croot)}}
        t, times, jobs = dry_run(tmp, "coco", {"datasets": {"coco": coco}}, "coco_cam_report", args.reps)
        print(f"COCO dry run: {t:.1f} s ({jobs} jobs, {len(clists['train_aug'])} train ids)")
        recs.append(_rec("5b", f"Workflow: snakemake -n, COCO ({len(clists['train_aug']):,} train ids)", 30, t,
                         times, {"jobs": jobs, "ids": {k: len(v) for k, v in clists.items()}}, csrc))

        if args.skip_toy:
            recs.append(result("5c", "Workflow: no-op rerun of a finished toy run", "< 10 s", "—", "—", None, None,
                               baseline_what="—", ours_what="snakemake --cores 2 toy_cam_report, second time",
                               reason="not run (--skip-toy)"))
        else:
            work = tmp / "toy"
            work.mkdir()
            cfgfile = TINY
            t_full, _ = snakemake(work, "--cores", "2", "toy_cam_report", configfile=cfgfile)
            times = []
            for _ in range(args.reps):
                dt, proc = snakemake(work, "--cores", "2", "toy_cam_report", configfile=cfgfile)
                times.append(dt)
                out = proc.stdout + proc.stderr
                if "Nothing to be done" not in out:
                    raise SystemExit(f"FAIL: the rerun of a finished toy run did work:\n{out[-3000:]}")
            print(f"toy no-op rerun: {min(times):.1f} s (the full tiny run took {t_full:.0f} s)")
            recs.append(_rec("5c", "Workflow: no-op rerun of a finished toy run", 10, min(times), times,
                             {"full_tiny_run_s": t_full, "config": str(TINY.relative_to(REPO))},
                             "tiny toy configuration (tests/configs/tiny_toy_cam.yaml)"))
    write_result(recs, "workflow")
    return 0


def _rec(item: str, title: str, goal_s: float, t: float, times: list[float], details: dict, data: str) -> dict:
    met = t < goal_s
    r = result(item, title, f"< {goal_s:g} s", "—", f"{t:.1f} s", t, met, baseline_what="— (absolute goal)",
               ours_what="snakemake 9 on the repo's Snakefile (subprocess, incl. Python start-up)",
               reason="" if met else f"{t:.1f} s ≥ {goal_s:g} s", details={**details, "seconds": times}, data=data)
    r["ratio_fmt"] = "{:.1f} s"
    return r


if __name__ == "__main__":
    sys.exit(main())
