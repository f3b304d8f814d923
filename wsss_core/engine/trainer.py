"""A small resumable training loop shared by every training stage.

Checkpoints (model, optimizer, scheduler, RNG states, step, seed, config hash) are written atomically
every ``checkpoint_every`` steps into ``ckpt_dir`` (a folder no rule declares, so Snakemake never
deletes it when a job is killed). A restarted job resumes from the newest readable checkpoint. Data
order and augmentation are a pure function of (seed, epoch, position), so a resumed run sees the
same batches as an uninterrupted one.

Multi-process jobs (:mod:`~wsss_core.engine.distributed`): each rank trains the raw model on its slice of every
global batch; gradients, BatchNorm statistics and logged scalars are averaged over the ranks, other buffers follow
rank 0, and rank 0 alone writes checkpoints (with every rank's RNG state), metrics and the final weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..faults import fault_point
from ..store.atomic import atomic_path
from . import distributed as ddp
from .logs import get_logger, progress

_CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def poly_lambda(max_steps: int, power: float) -> Callable[[int], float]:
    """lr multiplier (1 - step/max_steps)^power, the poly schedule of the WSSS references."""
    return lambda step: max(0.0, 1.0 - step / max_steps) ** power


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100003 + epoch


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[list[int]]:
    """Shuffled index batches of one epoch, a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    perm = torch.randperm(n_items, generator=g).tolist()
    n_full = n_items // batch_size if drop_last else math.ceil(n_items / batch_size)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]


def batch_stream(dataset, batch_size: int, seed: int, start_step: int, num_workers: int = 0,
                 collate_fn=None, rank: int = 0, world: int = 1, pin_memory: bool = False) -> Iterator[Any]:
    """Infinite stream of batches starting at global step ``start_step``.

    ``dataset.set_epoch(epoch)`` (if present) is called before each epoch so that augmentation can be
    seeded per (seed, epoch, index). ``rank`` of ``world`` ranks gets the ``rank``-th of ``world`` consecutive
    equal slices of each global batch of ``batch_size`` items (which must divide evenly). ``pin_memory``: batches
    in page-locked memory (set when training on CUDA: the host-to-device copies of :func:`batch_to_device` are then
    asynchronous); the values are unchanged.
    """
    n = len(dataset)
    if n < batch_size:
        raise ValueError(f"dataset has {n} items, fewer than the batch size {batch_size}")
    if batch_size % world or not 0 <= rank < world:
        raise ValueError(f"the global batch {batch_size} cannot be split evenly over {world} ranks (rank {rank})")
    share = batch_size // world
    per_epoch = n // batch_size
    epoch, pos = divmod(start_step, per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches = epoch_batches(n, batch_size, seed, epoch)[pos:]
        if world > 1:
            batches = [b[rank * share:(rank + 1) * share] for b in batches]
        # A private generator: iterating a DataLoader draws its workers' base seed from ``generator``,
        # which would otherwise be the global torch RNG, so a resume mid-epoch (one extra draw) would
        # change dropout etc. relative to an uninterrupted run.
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                             collate_fn=collate_fn, persistent_workers=False, generator=gen,
                                             pin_memory=pin_memory)
        yield from loader
        epoch, pos = epoch + 1, 0


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _CKPT_RE.match(p.name))


@dataclass
class TrainState:
    step: int = 0
    resumed_from: int | None = None


def rng_state() -> dict[str, Any]:
    """This process' global RNG states (torch, numpy, python, CUDA)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _seed_rank(rank: int) -> None:
    """Distinct global RNG streams for ranks > 0 (dropout etc. on different samples), from the job's seed."""
    seed_everything((torch.initial_seed() * 1000003 + rank) % 2**63)


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler,
                    extra: Mapping[str, Any], keep: int = 2, rng_ranks: list | None = None) -> Path:
    """Atomically write ``step_<step>.pt``; keep the ``keep`` newest. ``rng_ranks``: every rank's RNG state
    (multi-process jobs; ``rng`` is this process', rank 0's)."""
    path = Path(ckpt_dir) / f"step_{step:08d}.pt"
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
        **dict(extra),
    }
    with atomic_path(path, suffix=".pt", clean_stale=True) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(ckpt_dir, model: nn.Module, optimizer, scheduler, expect: Mapping[str, Any] | None = None,
                           rank: int = 0, world: int = 1) -> int:
    """Restore the newest readable checkpoint; return its step (0 if none). Unreadable ones are skipped.
    ``rank`` / ``world``: which RNG state to restore in a multi-process job (:func:`_restore`)."""
    log = get_logger()
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn file cannot exist (atomic writes), but a disk error can
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        for key, value in (expect or {}).items():
            if state.get(key) != value:
                log.warning("checkpoint %s has %s=%r, expected %r (other settings); deleting it", path, key,
                            state.get(key), value)
                path.unlink(missing_ok=True)  # it can never be resumed, and must not count towards `keep`
                break
        else:
            _restore(state, model, optimizer, scheduler, rank, world)
            return int(state["step"])
    return 0


def _restore(state: Mapping[str, Any], model: nn.Module, optimizer, scheduler, rank: int = 0, world: int = 1) -> None:
    """Load a checkpoint's states; rank ``rank`` of ``world`` gets its own RNG state when the checkpoint has one per
    rank of a job of the same size, else rank 0 gets ``rng`` and the other ranks fresh streams."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("rng_ranks")
    if world > 1 and ranks is not None and len(ranks) == world:
        set_rng_state(ranks[rank])
    elif rank == 0:
        set_rng_state(state["rng"])
    else:
        _seed_rank(rank)


def _resume(ckpt_dir, model: nn.Module, optimizer, scheduler, identity: Mapping[str, Any], r) -> int:
    """:func:`load_latest_checkpoint` on every rank of a job: rank 0 picks (and tidies) the checkpoint, the other
    ranks load the same file; a fresh start gives ranks > 0 their own RNG streams."""
    if not r.distributed:
        return load_latest_checkpoint(ckpt_dir, model, optimizer, scheduler, expect=identity)
    start = load_latest_checkpoint(ckpt_dir, model, optimizer, scheduler, identity, 0, r.world) if r.main else 0
    start = int(ddp.broadcast_object(start))
    if not r.main:
        if start:
            state = torch.load(Path(ckpt_dir) / f"step_{start:08d}.pt", map_location="cpu", weights_only=False)
            _restore(state, model, optimizer, scheduler, r.rank, r.world)
        else:
            _seed_rank(r.rank)
    ddp.broadcast_model(model)  # one starting point, whatever each rank built
    return start


def fit(model: nn.Module, step_fn: Callable[[nn.Module, Any, int], dict[str, Any]], batches_from: Callable[[int], Iterable],
        optimizer: torch.optim.Optimizer, scheduler, max_steps: int, ckpt_dir: str | os.PathLike,
        checkpoint_every: int, keep_checkpoints: int = 2, identity: Mapping[str, Any] | None = None,
        metrics_path: str | os.PathLike | None = None, desc: str = "train",
        after_step: Callable[[nn.Module, int], None] | None = None,
        max_grad_norm: float | None = None) -> TrainState:
    """Run ``step_fn(model, batch, step) -> {"loss": tensor, **scalars}`` until ``max_steps``, resumably.

    ``max_grad_norm``: clip the global L2 norm of the gradients before each step (SIPE/SFC clip at 1); the
    pre-clip norm is logged as ``grad_norm``.

    ``batches_from(start_step)`` returns the batch iterator starting at ``start_step``. ``identity``
    (e.g. seed and config hash) is stored in checkpoints and must match for a checkpoint to be resumed.
    Per-step scalars are appended to ``metrics_path`` (JSON lines) and summarised in the log.

    In a multi-process job (:func:`~wsss_core.engine.distributed.rank_info`) every rank calls ``fit`` with its own
    ``batches_from`` (its share of each global batch): gradients are averaged over the ranks before clipping and
    the optimizer step, buffers synchronised after ``after_step``, scalars averaged; rank 0 writes the metrics and
    the checkpoints.
    """
    log = get_logger()
    identity = dict(identity or {})
    r = ddp.rank_info()
    start = _resume(ckpt_dir, model, optimizer, scheduler, identity, r)
    state = TrainState(step=start, resumed_from=start or None)
    if start:
        log.info("resumed from checkpoint at step %d of %d (%s)", start, max_steps, ckpt_dir)
    else:
        log.info("starting training from step 0 of %d", max_steps)
    if start >= max_steps:
        return state
    metrics_fh = None
    if metrics_path and r.main:
        _truncate_metrics(metrics_path, start)
        metrics_fh = open(metrics_path, "a", encoding="utf-8", buffering=1)  # line-buffered
    sync_params = ddp.unique_params(model, optimizer) if r.distributed else []
    model.train()
    t0 = time.time()
    running: dict[str, float] = {}
    it = iter(batches_from(start))
    bar = progress(total=max_steps, initial=start, desc=desc, disable=not r.main)
    try:
        for step in range(start, max_steps):
            batch = next(it)
            out = step_fn(model, batch, step)
            loss = out["loss"]
            if not torch.isfinite(loss):  # a failing rank ends the whole job (the launcher stops the others)
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}"
                                         + (f" on rank {r.rank}" if r.distributed else ""))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.distributed:
                ddp.all_reduce_gradients(sync_params)
            if max_grad_norm is not None:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                out = {**out, "grad_norm": torch.nn.utils.clip_grad_norm_(params, max_grad_norm)}
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step(model, step)
            if r.distributed:
                ddp.sync_buffers(model)
            scalars = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
            if r.distributed:
                scalars = ddp.mean_scalars(scalars)
            scalars["lr"] = optimizer.param_groups[0]["lr"]
            for k, v in scalars.items():
                running[k] = running.get(k, 0.0) + v
            if metrics_fh:
                metrics_fh.write(_json_line({"step": step + 1, **scalars}))
            bar.update(1)
            done = step + 1
            if done % max(1, min(50, checkpoint_every)) == 0 or done == max_steps:
                n = done - state.step
                log.info("step %d/%d %s (%.2f s/step)", done, max_steps,
                         " ".join(f"{k}={v / n:.4f}" for k, v in running.items()), (time.time() - t0) / n)
                running, t0, state.step = {}, time.time(), done
            if done % checkpoint_every == 0 and done < max_steps:
                rng_ranks = ddp.all_gather_object(rng_state()) if r.distributed else None
                if r.main:
                    if metrics_fh:  # the metrics up to a checkpoint must survive a kill right after it
                        metrics_fh.flush()
                        os.fsync(metrics_fh.fileno())
                    save_checkpoint(ckpt_dir, done, model, optimizer, scheduler, identity, keep_checkpoints,
                                    rng_ranks=rng_ranks)
            fault_point("train_step", done, ckpt_dir)  # test hook (WSSS_FAULT), a no-op otherwise
        state.step = max_steps
    finally:
        bar.close()
        if metrics_fh:
            metrics_fh.close()
    return state


def _truncate_metrics(path: str | os.PathLike, start: int) -> None:
    """Keep only the metric lines of steps <= ``start`` (the resumed checkpoint); drop a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if start and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= start:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with atomic_path(path, suffix=".jsonl") as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")


def _json_line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj) + "\n"


def save_final(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Atomically write the final weights (``{"model": state_dict, "meta": {...}}``)."""
    with atomic_path(path, suffix=".pt", clean_stale=True) as tmp:
        torch.save({"model": model.state_dict(), "meta": dict(meta)}, tmp)


def load_final(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict:
    """Move the tensors of a batch dict to ``device`` (other entries, e.g. ids, unchanged)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _on_cuda(model: nn.Module) -> bool:
    """Whether ``model``'s parameters live on a CUDA device (then batches are pinned)."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


def train_stage(model: nn.Module, step_fn: Callable[[nn.Module, Any, int], dict[str, Any]], dataset,
                optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], seed: int, ckpt_dir: str | os.PathLike,
                metrics: str | os.PathLike, out_model: str | os.PathLike, meta: Mapping[str, Any],
                config_hash: str = "", desc: str = "train",
                after_step: Callable[[nn.Module, int], None] | None = None,
                before_save: Callable[[nn.Module], Mapping[str, Any] | None] | None = None,
                lr_lambda: Callable[[int], float] | None = None) -> TrainState:
    """The common tail of every training stage: poly LR over ``cfg['max_steps']``, resumable :func:`fit` on
    seeded batches of ``dataset`` (``batch_size``, ``num_workers``, ``checkpoint_every``, ``keep_checkpoints``,
    ``poly_power``, optional ``max_grad_norm`` from ``cfg``), then the final weights with ``meta`` (+ seed, config
    hash, steps, seconds). Logs the pretrained-weights report of ``model.backbone`` if it has one.

    ``before_save(model)``, if given, runs after the last step and before the final weights are written (e.g. to
    fill a buffer computed from the trained model, IRN's mean shift); a mapping it returns is added to ``meta``.
    The final file is written once, atomically, after it. ``lr_lambda(step)`` replaces the poly multiplier (e.g.
    MCTformer's per-epoch warm-up + cosine).

    In a multi-process job (the stage function re-run by each rank, :func:`~wsss_core.engine.distributed.launch_ranks`)
    ``cfg['batch_size']`` is the global batch, split evenly over the ranks; only rank 0 runs ``before_save`` and
    writes the final weights."""
    r = ddp.rank_info()
    info = getattr(model, "weights_info", None) or getattr(getattr(model, "backbone", None), "weights_info", None)
    if info:
        get_logger().info("pretrained weights: %s", info)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda or poly_lambda(cfg["max_steps"], cfg["poly_power"]))
    t0 = time.time()
    state = fit(model, step_fn,
                lambda start: batch_stream(dataset, cfg["batch_size"], seed, start, cfg.get("num_workers", 0),
                                           rank=r.rank, world=r.world, pin_memory=_on_cuda(model)),
                optimizer, scheduler, cfg["max_steps"], ckpt_dir, cfg["checkpoint_every"],
                cfg.get("keep_checkpoints", 2), identity={"seed": seed, "config_hash": config_hash},
                metrics_path=metrics, desc=desc, after_step=after_step,
                max_grad_norm=cfg.get("max_grad_norm"))
    if not r.main:
        return state
    if before_save is not None:
        meta = {**meta, **dict(before_save(model) or {})}
    save_final(out_model, model, {**meta, "cfg": dict(cfg), "seed": seed, "steps": cfg["max_steps"],
                                  "config_hash": config_hash, "train_seconds_this_run": time.time() - t0,
                                  **({"train_procs": r.world} if r.distributed else {})})
    get_logger().info("wrote %s", out_model)
    return state
