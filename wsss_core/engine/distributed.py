"""Data-parallel training inside one job: several ranks, one process per GPU (NCCL) or CPU processes (gloo).

Launch. A training stage function starts with::

    if launch_ranks(train_x, locals()):
        return

In the job's own process (Snakemake's ``script:``) :func:`launch_ranks` plans the ranks from the stage settings
(:func:`plan_ranks`: ``n_procs`` GPUs on CUDA, the rule asking for ``gpu=n_procs``; ``ddp_cpu_procs`` processes
when the job trains on CPU), takes the GPU lease for all of them, spawns one worker per rank
(``torch.multiprocessing``, start method *spawn*: CUDA cannot be forked) that calls the same stage function with
the same arguments, waits for them and returns True. With one rank it returns False and the function trains
in-process exactly as before. Inside a worker it returns False too: the worker runs the stage body;
:func:`~wsss_core.engine.context.start_job` gives it its device (``cuda:rank`` of the leased GPUs, or the CPU)
without taking a lease, and the trainer reads the rank from :func:`rank_info`. A rank that fails ends the job
(the launcher terminates the other ranks and re-raises).

Synchronisation, without a ``DistributedDataParallel`` wrapper: methods call attributes of the model
(``model.features``, ``model.classifier``, ``model.student``...), which a DDP wrapper hides and whose calls would
bypass DDP's forward (so its gradient hooks would not fire). Every rank runs the raw module on its share of the
global batch (``batch_size`` / world, consecutive slices of the global batch) and the trainer

* averages the gradients over the ranks after ``backward`` (:func:`all_reduce_gradients`, bucketed): with a loss
  that is a mean over the samples of the batch this is the gradient of the global batch;
* averages the running statistics of the BatchNorms in training mode and copies every other buffer from rank 0
  after each step (:func:`sync_buffers`; e.g. SFC's image bank, as DDP's ``broadcast_buffers``);
* averages the logged scalars over the ranks.

Parameters, buffers and optimizer states therefore stay identical on all ranks, so rank 0 alone writes the
checkpoints, the metrics and the final weights, and every rank resumes from the same checkpoint (which also holds
each rank's RNG state). BatchNorm in training mode normalises with the statistics of the rank's share (as DDP
without SyncBatchNorm), so a run with BN in training mode is close to, not equal to, the single-process run.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import distributed as dist
from torch import nn

from ..errors import ConfigError
from .devices import lease_gpus, release_gpus, visible_gpus
from .logs import setup_job_logging

#: bytes per all-reduce bucket of flattened gradients / buffers
BUCKET_BYTES = 32 * 2**20
#: how long a collective may wait for the other ranks (rank 0 writing a checkpoint, a slow data batch)
TIMEOUT = datetime.timedelta(minutes=60)

_RANK_DEVICE: torch.device | None = None  # set in a worker process by _worker


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def rank_info() -> RankInfo:
    """This process' rank and the world size (0 / 1 outside a multi-process job)."""
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return RankInfo()


def is_worker() -> bool:
    """True in a rank process spawned by :func:`run_ranks`."""
    return _RANK_DEVICE is not None


def rank_device() -> torch.device:
    """The device of this worker's rank (``cuda:rank`` or the CPU)."""
    if _RANK_DEVICE is None:
        raise RuntimeError("rank_device() outside a rank process")
    return _RANK_DEVICE


@dataclass(frozen=True)
class RankPlan:
    world: int
    backend: str  # nccl | gloo
    device: str  # cuda | cpu


def _procs(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def plan_ranks(cfg: Mapping[str, Any], device: str = "auto", lock_dir: str | os.PathLike = ".wsss/gpu-locks") -> RankPlan:
    """The ranks of a training job from its stage settings.

    ``n_procs`` (default 1): GPUs, one rank each, when the job trains on CUDA; the GPUs are leased here (local
    runs; the workers inherit ``CUDA_VISIBLE_DEVICES``) and held until the job ends. ``ddp_cpu_procs`` (default 1):
    ranks when the job trains on the CPU (``device: cpu``, or ``auto`` without a GPU), gloo backend; a test knob
    for the multi-process code path. World 1 means: train in-process (the caller takes its own lease then).
    """
    n = _procs(cfg, "n_procs")
    n_cpu = _procs(cfg, "ddp_cpu_procs")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return RankPlan(n_cpu, "gloo", "cpu")
    if n == 1:
        if n_cpu > 1 and device == "auto" and not visible_gpus():
            return RankPlan(n_cpu, "gloo", "cpu")
        return RankPlan(1, "nccl", "cuda")  # in-process: start_job leases the GPU (or falls back to the CPU)
    lease_gpus(n, lock_dir)
    if torch.cuda.is_available():  # only now: CUDA must see CUDA_VISIBLE_DEVICES as set by the lease
        if torch.cuda.device_count() < n:
            raise RuntimeError(f"n_procs = {n} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '-')})")
        return RankPlan(n, "nccl" if dist.is_nccl_available() else "gloo", "cuda")
    if device == "cuda":
        raise RuntimeError("device: cuda was requested but CUDA is not available")
    release_gpus()
    return RankPlan(n_cpu, "gloo", "cpu")


def check_global_batch(batch_size: int, world: int) -> int:
    """The per-rank batch: ``batch_size`` (the global batch) split evenly over ``world`` ranks."""
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} (the global batch) is not divisible by the {world} training "
                          f"processes; choose a multiple of {world}")
    return batch_size // world


def launch_ranks(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> bool:
    """Run the training stage ``fn(**kwargs)`` on several ranks when its settings ask for them.

    ``kwargs`` are the stage function's arguments (``locals()`` at its top); of its ``job``
    (:class:`~wsss_core.stages.job.JobSettings`) ``cfg`` (``n_procs``, ``ddp_cpu_procs``, ``batch_size``),
    ``device``, ``lock_dir`` and ``log`` are read. Returns True when the ranks ran (the caller returns), False when
    the caller should train in this process (one rank, or already a rank).
    """
    if is_worker():
        return False
    job = kwargs["job"]
    cfg = job.cfg
    plan = plan_ranks(cfg, job.device, job.lock_dir)
    if plan.world == 1:
        return False
    check_global_batch(int(cfg["batch_size"]), plan.world)
    logger = setup_job_logging(job.log)
    logger.info("job pid=%d: %d training processes (%s, %s backend; CUDA_VISIBLE_DEVICES=%s), global batch %d = "
                "%d x %d", os.getpid(), plan.world, plan.device, plan.backend,
                os.environ.get("CUDA_VISIBLE_DEVICES", "-"), cfg["batch_size"], plan.world,
                int(cfg["batch_size"]) // plan.world)
    run_ranks(fn, dict(kwargs), plan.world, plan.backend, plan.device)
    return True


def run_ranks(fn: Callable[..., Any], kwargs: Mapping[str, Any], world: int, backend: str = "gloo",
              device: str = "cpu") -> None:
    """Spawn ``world`` processes that each call ``fn(**kwargs)`` in a process group; wait for all of them.

    ``fn`` must be importable (a module-level function, not in ``__main__``) and ``kwargs`` picklable. The process
    group rendezvous through a file in a fresh temporary folder (no port to pick). Any rank's exception ends all
    ranks and is raised here (``torch.multiprocessing.ProcessRaisedException``, with the rank's traceback).
    """
    import torch.multiprocessing as mp

    if getattr(fn, "__module__", None) in (None, "__main__"):
        raise ValueError(f"{fn!r} must be defined in an importable module to run on spawned ranks")
    tmp = tempfile.mkdtemp(prefix="wsss-ddp-")
    try:
        with _main_module_hidden():
            context = mp.start_processes(_worker, args=(fn, dict(kwargs), world, backend, device,
                                                        os.path.join(tmp, "store")),
                                         nprocs=world, join=False, start_method="spawn")
        while not context.join():
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned processes re-import the parent's ``__main__`` (by its ``__spec__`` or ``__file__``) before running
    their target. Snakemake's ``script:`` *is* a ``__main__`` whose top level runs the job, so each rank would run
    the whole job again (and fail: a process may not spawn while bootstrapping). The ranks need nothing from
    ``__main__``: hide it while they start."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _worker(rank: int, fn: Callable[..., Any], kwargs: dict, world: int, backend: str, device: str,
            store: str) -> None:
    global _RANK_DEVICE
    if device == "cuda":
        torch.cuda.set_device(rank)
        _RANK_DEVICE = torch.device("cuda", rank)
    else:
        _RANK_DEVICE = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        fn(**kwargs)
        dist.barrier()  # every rank done (rank 0 has written the model) before any tears its gloo threads down
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ collectives

def _comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU with NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Runs of tensors of one device and dtype, each at most BUCKET_BYTES (unless a single tensor is larger)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket


def _collective(tensors: list[torch.Tensor], op: str) -> None:
    """In place over ``tensors``: ``mean`` (all-reduce average) or ``broadcast`` (from rank 0), bucketed."""
    world = dist.get_world_size()
    for bucket in _buckets([t for t in tensors if t.numel()]):
        dev = _comm_device()
        flat = torch.cat([t.detach().reshape(-1) for t in bucket]).to(dev)
        if flat.dtype == torch.bool:  # not every backend reduces / broadcasts bool
            flat = flat.to(torch.uint8)
        if op == "mean":
            if not flat.is_floating_point():
                raise TypeError(f"cannot average {flat.dtype} tensors over the ranks")
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
        else:
            dist.broadcast(flat, src=0)
        offset = 0
        for t in bucket:
            n = t.numel()
            with torch.no_grad():
                t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def unique_params(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` and ``optimizer`` in a fixed order (identical on every rank)."""
    seen, out = set(), []
    extra = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
    for p in [*model.parameters(), *extra]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Average ``p.grad`` over the ranks. A parameter without a gradient on some ranks counts as zero there; one
    without a gradient on every rank keeps ``grad = None`` (so the optimizer still skips it, as in one process)."""
    if not params:
        return
    dev = _comm_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, any_grad in zip(params, has.tolist()):
        if not any_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            raise NotImplementedError("multi-process training does not support sparse gradients")
        grads.append(p.grad)
    _collective(grads, "mean")


def _bn_stats(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                if t is not None:
                    ids.add(id(t))
    return ids


def sync_buffers(model: nn.Module) -> None:
    """Make the buffers identical on every rank: the running mean / var of BatchNorms in training mode are
    averaged (each rank saw its share of the batch), every other buffer is copied from rank 0."""
    bn = _bn_stats(model)
    seen, mean, bcast = set(), [], []
    for b in model.buffers():
        if id(b) in seen:
            continue
        seen.add(id(b))
        (mean if id(b) in bn and b.is_floating_point() else bcast).append(b)
    _collective(mean, "mean")
    _collective(bcast, "broadcast")


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (the common start of the ranks)."""
    seen, tensors = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append(t.data if isinstance(t, nn.Parameter) else t)
    _collective(tensors, "broadcast")


def mean_scalars(scalars: Mapping[str, float]) -> dict[str, float]:
    """The per-step scalars averaged over the ranks (every rank must log the same keys, in the same order)."""
    keys = list(scalars)
    dev = _comm_device()
    vec = torch.tensor([float(scalars[k]) for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (vec / dist.get_world_size()).tolist()))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
