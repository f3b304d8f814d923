"""Tests of wsss_core.engine.devices: the flock-based local GPU lease (no GPU needed) and select_device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from wsss_core.engine import devices
from wsss_core.engine.devices import lease_gpus, release_gpus, select_device, visible_gpus

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import os, sys
    from wsss_core.engine.devices import lease_gpus
    ids = lease_gpus(1, sys.argv[1], timeout=10, poll=0.05)
    print(",".join(ids), os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    sys.stdin.read()  # hold the lease until the test closes our stdin
""")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # restored (whatever lease_gpus sets) at teardown
    yield
    release_gpus()


def _start_holder(lock_dir) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="3,5", PYTHONPATH=str(REPO))
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _read_lease(p: subprocess.Popen) -> tuple[str, str]:
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"holder failed: {p.stderr.read()}")
    ids, cvd = line.split()
    return ids, cvd


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.stdin.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_concurrent_leases_are_distinct_and_released_on_exit(tmp_path):
    lock_dir = tmp_path / "locks"
    holders = [_start_holder(lock_dir), _start_holder(lock_dir)]
    try:
        leases = [_read_lease(p) for p in holders]
        # each got one GPU, the two are distinct, and each restricted itself to it
        assert {ids for ids, _ in leases} == {"3", "5"}
        assert all(ids == cvd for ids, cvd in leases)

        # a third job finds both GPUs taken
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            lease_gpus(1, lock_dir, timeout=0.5, poll=0.05)
        assert time.monotonic() - t0 < 5
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # unchanged by the failed lease

        # one holder exits (its lock dies with it): its GPU becomes available to us
        _stop(holders[0])
        got = lease_gpus(1, lock_dir, timeout=5, poll=0.05)
        assert got == [leases[0][0]]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == leases[0][0]
    finally:
        for p in holders:
            _stop(p)
    release_gpus()


def test_killed_holder_releases_lock(tmp_path):
    lock_dir = tmp_path / "locks"
    holders = [_start_holder(lock_dir), _start_holder(lock_dir)]
    try:
        for p in holders:
            _read_lease(p)
        for p in holders:
            p.kill()  # SIGKILL: no cleanup code runs
            p.wait()
        got = lease_gpus(2, lock_dir, timeout=5, poll=0.05)
        assert sorted(got) == ["3", "5"]
        assert sorted(os.environ["CUDA_VISIBLE_DEVICES"].split(",")) == ["3", "5"]
    finally:
        for p in holders:
            _stop(p)


def test_release_gpus_frees_locks_within_process(tmp_path):
    a = lease_gpus(1, tmp_path, timeout=1, poll=0.05)
    os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
    b = lease_gpus(1, tmp_path, timeout=1, poll=0.05)
    assert {a[0], b[0]} == {"3", "5"}  # the first lease still holds its lock
    os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
    with pytest.raises(TimeoutError):
        lease_gpus(1, tmp_path, timeout=0.2, poll=0.05)
    release_gpus()
    assert devices._HELD == []
    os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
    assert len(lease_gpus(2, tmp_path, timeout=1, poll=0.05)) == 2


def test_slurm_takes_no_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    assert lease_gpus(1, tmp_path / "locks") == []
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert not (tmp_path / "locks").exists()


def test_zero_gpus_is_empty(tmp_path):
    assert lease_gpus(0, tmp_path / "locks") == []
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert not (tmp_path / "locks").exists()


def test_more_gpus_than_visible_raises(tmp_path):
    with pytest.raises(RuntimeError, match="3 GPUs"):
        lease_gpus(3, tmp_path, timeout=0.1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_visible_gpus_parses_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 0, 2 ,")
    assert visible_gpus() == ["0", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_no_visible_gpu_no_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert lease_gpus(1, tmp_path / "locks") == []


def test_select_device_cpu(tmp_path):
    assert select_device("cpu", lock_dir=tmp_path) == torch.device("cpu")
    assert not any(tmp_path.iterdir())  # cpu takes no lease


def test_select_device_rejects_unknown():
    with pytest.raises(ValueError):
        select_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_select_device_cuda_without_cuda_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="CUDA"):
        select_device("cuda", lock_dir=tmp_path)
    assert select_device("auto", lock_dir=tmp_path) == torch.device("cpu")


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from wsss_core.engine.devices import lease_gpus
    lock_dir, n, hold, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    ids = lease_gpus(n, lock_dir, timeout=60, poll=0.02)
    t0 = time.monotonic()
    with open(log + ".start", "w") as fh:  # tells the test we hold the lease (it may SIGKILL us now)
        fh.write(",".join(ids))
    time.sleep(hold)
    with open(log, "w") as fh:
        json.dump({"ids": ids, "cvd": os.environ["CUDA_VISIBLE_DEVICES"], "t0": t0, "t1": time.monotonic()}, fh)
""")


def test_many_concurrent_jobs_never_share_a_device_and_a_killed_job_frees_its(tmp_path):
    """Eight jobs (wanting 1 or 2 GPUs) start at once on 3 faked GPUs: every lease interval on a device is
    disjoint from the others on it, each job sees only its own devices, and a job SIGKILLed while holding two
    GPUs lets the waiting jobs through (all finish)."""
    lock_dir = tmp_path / "locks"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1,2", PYTHONPATH=str(REPO))
    env.pop("SLURM_JOB_ID", None)
    victim_log = tmp_path / "victim.json"
    victim = subprocess.Popen([sys.executable, "-c", WORKER, str(lock_dir), "2", "30", str(victim_log)], env=env)
    deadline = time.monotonic() + 30
    while not victim_log.with_suffix(".json.start").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "victim never got its lease"
        time.sleep(0.02)
    victim_ids = victim_log.with_suffix(".json.start").read_text().split(",")
    assert len(victim_ids) == 2
    wants = [1, 2, 1, 1, 2, 1, 1]
    logs = [tmp_path / f"job{i}.json" for i in range(len(wants))]
    jobs = [subprocess.Popen([sys.executable, "-c", WORKER, str(lock_dir), str(n), "0.4", str(log)], env=env)
            for n, log in zip(wants, logs)]
    try:
        time.sleep(1.5)  # the jobs wanting 2 GPUs cannot start while the victim holds 2 of the 3
        assert all(not logs[i].with_suffix(".json.start").exists() for i, n in enumerate(wants) if n == 2)
        killed_at = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the jobs' stamps
        victim.kill()  # SIGKILL: no cleanup code runs; the kernel drops its flocks
        victim.wait()
        for p in jobs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in [victim, *jobs]:
            if p.poll() is None:
                p.kill()
    records = [json.loads(log.read_text()) for log in logs]
    for n, r in zip(wants, records):
        assert len(r["ids"]) == n and len(set(r["ids"])) == n
        assert r["cvd"] == ",".join(r["ids"]) and set(r["ids"]) <= {"0", "1", "2"}
    for gpu in "012":
        spans = sorted((r["t0"], r["t1"]) for r in records if gpu in r["ids"])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"GPU {gpu} leased twice at once: {spans}"
    # the two-GPU jobs got their lease only once the victim's died, and one of them got a victim's GPU
    two = [r for n, r in zip(wants, records) if n == 2]
    assert all(r["t0"] >= killed_at for r in two)
    assert any(set(victim_ids) & set(r["ids"]) for r in records if r["t0"] >= killed_at)
