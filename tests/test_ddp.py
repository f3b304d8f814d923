"""Multi-process (data-parallel) training inside one job: wsss_core.engine.distributed + the trainer.

CPU, gloo backend, 2 processes (each with one intra-op thread). The ranks are spawned by
:func:`~wsss_core.engine.distributed.run_ranks`, which needs the rank function at module level (``_train``).

* 2 processes x batch B/2 give the loss curve and the weights of 1 process x batch B (same seed). The model of
  that comparison has no BatchNorm and no dropout: per-rank BN batch statistics differ from full-batch ones, and
  dropout draws from each rank's own RNG stream.
* only rank 0 writes files (ranks > 0 run with every file-writing call under the output folder forbidden);
  several trainings share one launch where they can, as spawning 2 processes costs seconds;
* a 2-process run killed after a checkpoint resumes exactly (model with BatchNorm in training mode and dropout:
  buffer sync and per-rank RNG states in the checkpoint).
"""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_data, tiny_cam_classifier
import torch.nn.functional as F
from torch import nn

from wsss_core.engine import distributed as ddp
from wsss_core.engine.trainer import batch_stream, list_checkpoints, load_final, seed_everything, train_stage
from wsss_core.errors import ConfigError

SEED = 5
N_ITEMS, BATCH = 16, 4  # 4 global batches per epoch: a checkpoint at step 3 falls mid-epoch
MAX_STEPS, CKPT_EVERY = 8, 3


def TinyData(n: int = N_ITEMS, seed: int = SEED):  # noqa: N802 (the dataset's former class name)
    return make_tiny_data(n, seed, flip=False)


def make_model(kind: str) -> nn.Module:
    if kind == "plain":  # no BN, no dropout: 2 x B/2 == 1 x B
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    # BatchNorm in training mode (buffers to sync) and dropout (per-rank RNG streams)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


class Killed(RuntimeError):
    pass


def _forbid_writes(root: str) -> None:
    """Make every file-writing call on a path under ``root`` raise in this process."""
    root = os.path.realpath(root)

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fspath(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def deny(what, path):
        raise PermissionError(f"rank {ddp.rank_info().rank} must not write files: {what} {path}")

    def wrap_open(orig):
        def guarded(file, mode="r", *a, **kw):
            if inside(file) and any(c in mode for c in "wax+"):
                deny("open", file)
            return orig(file, mode, *a, **kw)
        return guarded

    def wrap_os_open(orig):
        def guarded(path, flags, *a, **kw):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
                deny("os.open", path)
            return orig(path, flags, *a, **kw)
        return guarded

    def wrap_path_op(name, orig):
        def guarded(path, *a, **kw):
            if inside(path):
                deny(name, path)
            return orig(path, *a, **kw)
        return guarded

    def wrap_save(orig):
        def guarded(obj, f, *a, **kw):
            if isinstance(f, (str, os.PathLike)) and inside(f):  # the zip writer opens the file in C++
                deny("torch.save", f)
            return orig(obj, f, *a, **kw)
        return guarded

    torch.save = wrap_save(torch.save)
    builtins.open = io.open = wrap_open(builtins.open)
    os.open = wrap_os_open(os.open)
    for name in ("replace", "rename", "unlink", "remove", "mkdir", "makedirs", "rmdir"):
        setattr(os, name, wrap_path_op(name, getattr(os, name)))


def _train_all(jobs: list[dict], guard: str | None = None) -> None:
    """Several training jobs one after the other in the same ranks (a spawn costs seconds); ranks > 0 may not
    write anything under ``guard``."""
    if guard and not ddp.rank_info().main:
        _forbid_writes(guard)
    for job in jobs:
        _train(**job)


def _train(out: str, kind: str = "plain", fail_at: int | None = None, fail_rank: int = 0) -> None:
    """One training job: on every rank when spawned by run_ranks, or in-process (1 rank). Writes ``out``/
    {checkpoints/, metrics.jsonl, model.pt}."""
    r = ddp.rank_info()
    torch.set_num_threads(1)
    seed_everything(0)  # the same initial weights on every rank
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cfg = {"batch_size": BATCH, "max_steps": MAX_STEPS, "poly_power": 0.9, "checkpoint_every": CKPT_EVERY,
           "num_workers": 0, "keep_checkpoints": 2}

    def step_fn(model, batch, step):
        if fail_at is not None and step == fail_at and r.rank == fail_rank:
            raise Killed(f"killed at step {step} on rank {r.rank}")
        loss = F.mse_loss(model(batch["x"]), batch["y"])  # a mean over the samples
        return {"loss": loss, "n_items": float(len(batch["index"]))}

    train_stage(model, step_fn, TinyData(), opt, cfg, SEED, f"{out}/checkpoints", f"{out}/metrics.jsonl",
                f"{out}/model.pt", {"kind": kind}, config_hash="h", desc="ddp test")


def run(out: Path, world: int, guard: bool = False, **kw) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if world == 1:
        _train(str(out), **kw)
    else:
        ddp.run_ranks(_train_all, {"jobs": [{"out": str(out), **kw}], "guard": str(out) if guard else None}, world)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_final(out / "model.pt")["model"]


@pytest.fixture(scope="module")
def one_proc_plain(tmp_path_factory):
    n = torch.get_num_threads()
    try:
        return run(tmp_path_factory.mktemp("p1"), 1)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    """One launch of 2 ranks training the plain model (-> plain/) and the BN + dropout one (-> bn/); rank 1 may
    not write anything under the folder."""
    root = tmp_path_factory.mktemp("p2")
    ddp.run_ranks(_train_all, {"jobs": [{"out": str(root / "plain")}, {"out": str(root / "bn"), "kind": "bn_dropout"}],
                               "guard": str(root)}, 2)
    return root


@pytest.fixture(scope="module")
def two_procs_plain(two_procs):
    return two_procs / "plain"


def test_two_processes_half_batches_match_one_process(one_proc_plain, two_procs_plain):
    m1, m2 = metrics(one_proc_plain), metrics(two_procs_plain)
    assert [m["step"] for m in m2] == list(range(1, MAX_STEPS + 1)) == [m["step"] for m in m1]
    loss1, loss2 = np.array([m["loss"] for m in m1]), np.array([m["loss"] for m in m2])
    np.testing.assert_allclose(loss2, loss1, rtol=1e-4, atol=1e-7)
    assert not np.allclose(loss1, loss1[0])  # it trains
    assert [m["n_items"] for m in m1] == [BATCH] * MAX_STEPS
    assert [m["n_items"] for m in m2] == [BATCH // 2] * MAX_STEPS  # each rank saw half of the global batch
    np.testing.assert_allclose([m["lr"] for m in m2], [m["lr"] for m in m1])
    w1, w2 = weights(one_proc_plain), weights(two_procs_plain)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert load_final(two_procs_plain / "model.pt")["meta"]["train_procs"] == 2


def test_only_rank0_writes(two_procs, two_procs_plain):
    # rank 1 ran with every write under the folder forbidden (a PermissionError would have failed the job),
    # so these files are rank 0's
    assert sorted(p.name for p in two_procs.iterdir()) == ["bn", "plain"]
    assert (two_procs_plain / "model.pt").is_file()
    assert [p.name for p in list_checkpoints(two_procs_plain / "checkpoints")] == ["step_00000003.pt",
                                                                                    "step_00000006.pt"]
    assert sorted(p.name for p in two_procs_plain.iterdir()) == ["checkpoints", "metrics.jsonl", "model.pt"]
    ckpt = torch.load(two_procs_plain / "checkpoints" / "step_00000006.pt", weights_only=False)
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])  # own streams


def test_two_process_resume_after_kill_is_exact(tmp_path, two_procs):
    full = two_procs / "bn"  # uninterrupted
    out = tmp_path / "resumed"
    with pytest.raises(Exception, match="killed at step 5 on rank 1"):
        run(out, 2, kind="bn_dropout", fail_at=5, fail_rank=1)  # a failing rank ends the job
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003.pt"]
    assert not (out / "model.pt").exists()
    run(out, 2, guard=True, kind="bn_dropout")
    assert [m["step"] for m in metrics(out)] == list(range(1, MAX_STEPS + 1))
    assert metrics(out) == metrics(full)
    wf, wr = weights(full), weights(out)
    assert wf.keys() == wr.keys()
    for k in wf:
        assert torch.equal(wr[k], wf[k]), k
    assert wf["1.num_batches_tracked"].item() == MAX_STEPS


def test_batch_stream_ranks_split_the_global_batch():
    data = TinyData()
    full = batch_stream(data, BATCH, SEED, 2)
    parts = [batch_stream(data, BATCH, SEED, 2, rank=r, world=2) for r in range(2)]
    for _ in range(6):  # across an epoch boundary
        b = next(full)["index"].tolist()
        assert next(parts[0])["index"].tolist() + next(parts[1])["index"].tolist() == b
    with pytest.raises(ValueError, match="split evenly"):
        next(batch_stream(data, 5, SEED, 0, rank=0, world=2))


def test_plan_ranks(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert ddp.plan_ranks({}, "cpu").world == 1
    assert ddp.plan_ranks({"n_procs": 4}, "cpu") == ddp.RankPlan(1, "gloo", "cpu")  # GPUs only on CUDA
    assert ddp.plan_ranks({"ddp_cpu_procs": 2}, "cpu") == ddp.RankPlan(2, "gloo", "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # auto without a GPU: the CPU knob
    assert ddp.plan_ranks({"ddp_cpu_procs": 2}, "auto") == ddp.RankPlan(2, "gloo", "cpu")
    for bad in ({"n_procs": 0}, {"ddp_cpu_procs": 1.5}, {"n_procs": True}):
        with pytest.raises(ConfigError):
            ddp.plan_ranks(bad, "cpu")
    assert ddp.check_global_batch(8, 2) == 4
    with pytest.raises(ConfigError, match="not divisible"):
        ddp.check_global_batch(6, 4)


def test_launch_ranks_is_a_no_op_for_one_rank():
    from wsss_core.stages.job import JobSettings

    assert ddp.launch_ranks(_train, {"job": JobSettings(cfg={"batch_size": 4}, device="cpu")}) is False
    with pytest.raises(ConfigError, match="not divisible"):
        ddp.launch_ranks(_train, {"job": JobSettings(cfg={"batch_size": 5, "ddp_cpu_procs": 2}, device="cpu")})


@pytest.mark.slow
def test_train_classifier_two_cpu_processes(tmp_path, monkeypatch):
    """The stage function launches its ranks itself (classifier.ddp_cpu_procs: 2, device cpu): cam method, tiny
    ResNet (its BatchNorm trains, so the loss is only close to a 1-process run's: not compared here)."""
    import sys

    from wsss_core.stages.classifier import load_method_model, train_classifier
    from wsss_core.stages.job import Files, JobSettings

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # the launcher points them at the job log: restore afterwards
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    prepared, cfg = tiny_cam_classifier(tmp_path, max_steps=4, ddp_cpu_procs=2)
    state, log = tmp_path / "state", tmp_path / "train.log"
    job = JobSettings(prepared=prepared, splits={"train": "train_aug"}, method="cam", cfg=cfg, device="cpu",
                      config_hash="h", log=str(log), threads=2)
    train_classifier(job, Files(saliency=[]), Files(model=str(tmp_path / "model.pt")))
    text = log.read_text()
    assert "2 training processes (cpu, gloo backend" in text and "rank 0 of 2" in text
    assert [m["step"] for m in metrics(state)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(state / "checkpoints")] == ["step_00000002.pt"]
    m, model, meta = load_method_model(str(tmp_path / "model.pt"), torch.device("cpu"))
    assert meta["train_procs"] == 2 and meta["method"] == "cam"


def test_spawned_ranks_do_not_rerun_main(monkeypatch):
    """Snakemake's ``script:`` is a ``__main__`` whose top level runs the job: the ranks must not import it."""
    import sys
    import types
    from multiprocessing import spawn

    main = types.ModuleType("__main__")
    main.__file__ = "/somewhere/.snakemake/scripts/tmpabc.train_classifier.py"
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert "init_main_from_path" in spawn.get_preparation_data("x")
    with ddp._main_module_hidden():
        data = spawn.get_preparation_data("x")
        assert "init_main_from_path" not in data and "init_main_from_name" not in data
    assert main.__file__.endswith("train_classifier.py") and main.__spec__ is None
    with pytest.raises(ValueError, match="importable module"):
        ddp.run_ranks(types.FunctionType(_train_all.__code__, {"__name__": "__main__"}), {}, 2)
