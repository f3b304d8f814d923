"""Tests of wsss_core.engine.trainer: exact resume, deterministic data order, schedule, checkpoint housekeeping."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import make_tiny_data
from torch import nn

from wsss_core.engine.trainer import (
    batch_stream,
    epoch_batches,
    fit,
    list_checkpoints,
    load_latest_checkpoint,
    poly_lambda,
    save_checkpoint,
)

SEED = 7
N_ITEMS, BATCH = 10, 3  # 3 batches per epoch: checkpoints at step 4 and 8 fall mid-epoch
MAX_STEPS, CKPT_EVERY = 12, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def TinyData(n: int = N_ITEMS, seed: int = SEED):  # noqa: N802 (the dataset's former class name)
    return make_tiny_data(n, seed, flip=True)


def tiny_model() -> nn.Module:
    # BatchNorm (buffers) and Dropout (global RNG) make an inexact resume visible
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


class Killed(RuntimeError):
    pass


def train(ckpt_dir, fail_at: int | None = None, identity=None, max_steps: int = MAX_STEPS,
          checkpoint_every: int = CKPT_EVERY, keep: int = 2, metrics_path=None, rng_seed: int = 0):
    """One fresh process' worth of training: new model/optimizer/scheduler from the same seeds.

    ``rng_seed`` seeds the global RNGs after the model is built (it drives dropout).
    """
    torch.manual_seed(0)
    model = tiny_model()
    torch.manual_seed(rng_seed)
    np.random.seed(rng_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(max_steps, 0.9))
    data = TinyData()
    seen: dict[int, list[int]] = {}

    def step_fn(model, batch, step):
        if fail_at is not None and step == fail_at:
            raise Killed(f"killed at step {step}")
        seen[step] = batch["index"].tolist()
        return {"loss": nn.functional.mse_loss(model(batch["x"]), batch["y"]), "extra": 1.0}

    state = fit(model, step_fn, lambda start: batch_stream(data, BATCH, SEED, start), opt, sched, max_steps,
                ckpt_dir, checkpoint_every, keep_checkpoints=keep,
                identity=identity if identity is not None else {"seed": SEED, "config_hash": "h1"},
                metrics_path=metrics_path)
    return state, model, opt, seen


def test_resume_after_kill_is_exact(tmp_path, caplog):
    ref_state, ref_model, ref_opt, ref_seen = train(tmp_path / "ref")
    assert ref_state.step == MAX_STEPS and ref_state.resumed_from is None
    assert sorted(ref_seen) == list(range(MAX_STEPS))

    ckpt = tmp_path / "run"
    with pytest.raises(Killed):
        train(ckpt, fail_at=9)  # steps 0..8 ran, the checkpoint of step 8 exists, step 9 dies
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000004.pt", "step_00000008.pt"]

    with caplog.at_level(logging.INFO, logger="wsss"):
        state, model, opt, seen = train(ckpt)
    assert state.resumed_from == 8
    assert state.step == MAX_STEPS
    assert "resumed from checkpoint at step 8" in caplog.text
    assert sorted(seen) == list(range(8, MAX_STEPS))
    assert all(seen[s] == ref_seen[s] for s in seen)  # same batches as the uninterrupted run

    ref_sd, sd = ref_model.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], sd[k]), k
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    # and a non-trivial amount of training happened (the test could tell runs apart)
    torch.manual_seed(0)
    init = tiny_model().state_dict()
    assert not torch.equal(init["6.weight"], sd["6.weight"])


def test_resume_restores_global_rng(tmp_path):
    """Dropout depends on the global RNG; the checkpoint's RNG state makes the resume exact regardless of it."""
    _, ref_model, _, _ = train(tmp_path / "ref")
    _, other_rng, _, _ = train(tmp_path / "other", rng_seed=999)
    assert not torch.equal(other_rng.state_dict()["6.weight"], ref_model.state_dict()["6.weight"])
    with pytest.raises(Killed):
        train(tmp_path / "run", fail_at=5)  # dies after the step-4 checkpoint
    _, model, _, _ = train(tmp_path / "run", rng_seed=999)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_fit_past_max_steps_returns_without_training(tmp_path):
    with pytest.raises(Killed):
        train(tmp_path, fail_at=9)
    state, _, _, seen = train(tmp_path, max_steps=8)
    assert state.step == 8 and state.resumed_from == 8
    assert seen == {}


def test_metrics_lines(tmp_path):
    metrics = tmp_path / "m" / "metrics.jsonl"
    train(tmp_path / "ck", metrics_path=metrics)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert all({"loss", "lr", "extra"} <= r.keys() for r in rows)
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0


# ---------------------------------------------------------------- data order


def test_epoch_batches_pure_and_varies():
    a = epoch_batches(10, 3, seed=5, epoch=2)
    assert a == epoch_batches(10, 3, seed=5, epoch=2)
    assert len(a) == 3 and all(len(b) == 3 for b in a)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    epochs = [epoch_batches(10, 3, seed=5, epoch=e) for e in range(5)]
    assert len({json.dumps(e) for e in epochs}) == 5
    assert epoch_batches(10, 3, seed=6, epoch=2) != a
    full = epoch_batches(10, 3, seed=5, epoch=2, drop_last=False)
    assert [len(b) for b in full] == [3, 3, 3, 1]
    assert sorted(i for b in full for i in b) == list(range(10))
    assert full[:3] == a


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])
def test_batch_stream_start_equals_skip(k):
    ref = batch_stream(TinyData(), BATCH, SEED, 0)
    for _ in range(k):
        next(ref)
    resumed = batch_stream(TinyData(), BATCH, SEED, k)
    for _ in range(5):
        a, b = next(ref), next(resumed)
        assert a["index"].tolist() == b["index"].tolist()
        assert torch.equal(a["x"], b["x"])


def test_batch_stream_augmentation_depends_on_epoch():
    s = batch_stream(TinyData(), BATCH, SEED, 0)
    per_epoch = N_ITEMS // BATCH
    x_by_epoch = []
    for e in range(2):
        xs = {}
        for _ in range(per_epoch):
            b = next(s)
            xs.update({int(i): x for i, x in zip(b["index"], b["x"])})
        x_by_epoch.append(xs)
    common = set(x_by_epoch[0]) & set(x_by_epoch[1])
    assert common
    assert any(not torch.equal(x_by_epoch[0][i], x_by_epoch[1][i]) for i in common)


def test_batch_stream_too_small_dataset():
    with pytest.raises(ValueError):
        next(batch_stream(TinyData(n=2), 3, 0, 0))


# ---------------------------------------------------------------- schedule


def test_poly_lambda_values():
    f = poly_lambda(100, 0.9)
    assert f(0) == 1.0
    assert f(100) == 0.0
    assert f(150) == 0.0
    assert f(50) == pytest.approx(0.5 ** 0.9)
    assert f(90) == pytest.approx(0.1 ** 0.9)
    vals = [f(s) for s in range(101)]
    assert all(a > b for a, b in zip(vals[:-1], vals[1:]))
    assert poly_lambda(10, 1.0)(3) == pytest.approx(0.7)


# ---------------------------------------------------------------- checkpoints


def test_keep_checkpoints_keeps_newest(tmp_path):
    train(tmp_path / "a", max_steps=11, checkpoint_every=2, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == [
        "step_00000006.pt", "step_00000008.pt", "step_00000010.pt"]
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = tmp_path / "b"
    for step in (1, 2, 3, 4):
        save_checkpoint(d, step, model, opt, None, {}, keep=1)
        assert [p.name for p in list_checkpoints(d)] == [f"step_{step:08d}.pt"]
    assert sorted(p.name for p in d.iterdir()) == ["step_00000004.pt"]  # no temp files left


def test_checkpoint_with_other_identity_is_ignored(tmp_path, caplog):
    torch.manual_seed(3)
    stale = tiny_model()
    stale_opt = torch.optim.SGD(stale.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 8, stale, stale_opt, None, {"seed": SEED, "config_hash": "OLD"})

    with caplog.at_level(logging.WARNING, logger="wsss"):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        assert load_latest_checkpoint(tmp_path, model, opt, None, expect={"config_hash": "NEW"}) == 0
    assert "config_hash" in caplog.text
    assert not torch.equal(model[0].weight, stale[0].weight)
    # a checkpoint of other settings can never be resumed: it is deleted so it cannot crowd out new ones
    assert not (tmp_path / "step_00000008.pt").exists()
    assert load_latest_checkpoint(tmp_path, model, opt, None, expect={"config_hash": "OLD", "seed": SEED}) == 0

    state, _, _, seen = train(tmp_path, identity={"seed": SEED, "config_hash": "NEW"}, max_steps=5)
    assert state.resumed_from is None
    assert sorted(seen) == list(range(5))


def test_unreadable_newest_checkpoint_is_skipped(tmp_path):
    torch.manual_seed(4)
    good = tiny_model()
    save_checkpoint(tmp_path, 4, good, torch.optim.SGD(good.parameters(), lr=0.1), None, {"config_hash": "h"})
    (tmp_path / "step_00000008.pt").write_bytes(b"garbage, e.g. a disk error")
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert load_latest_checkpoint(tmp_path, model, opt, None, expect={"config_hash": "h"}) == 4
    assert torch.equal(model[0].weight, good[0].weight)
    assert load_latest_checkpoint(tmp_path / "nowhere", model, opt, None) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises(tmp_path, bad):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()

    def step_fn(model, batch, step):
        out = model(batch["x"]).sum()
        return {"loss": out * bad if step == 2 else out * 0.0}

    with pytest.raises(FloatingPointError, match="step 2"):
        fit(model, step_fn, lambda s: batch_stream(TinyData(), BATCH, SEED, s), opt, None, 10, tmp_path, 100)
    assert torch.equal(model[0].weight, before)  # zero loss = zero gradient; the bad step never stepped


def test_max_grad_norm_clips_the_update_and_logs_the_norm(tmp_path):
    """One plain-SGD step with lr 1: the parameter change is the clipped gradient, so its norm is <= the limit."""
    torch.manual_seed(0)
    model = tiny_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    data = TinyData()

    def step_fn(m, batch, step):
        return {"loss": 100.0 * nn.functional.mse_loss(m(batch["x"]), batch["y"])}

    fit(model, step_fn, lambda start: batch_stream(data, BATCH, SEED, start), opt, None, 1, tmp_path / "c", 10,
        metrics_path=tmp_path / "m.jsonl", max_grad_norm=0.01)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 0.01 + 1e-6
    row = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert row["grad_norm"] > 0.01  # the pre-clip norm, logged
