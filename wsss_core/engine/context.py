"""Common start-up of a pipeline job: logging to the job's log file, threads, seeds, device (with GPU lease)."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass

import torch

from .devices import select_device
from .distributed import is_worker, rank_device, rank_info
from .logs import setup_job_logging
from .trainer import seed_everything


@dataclass
class Job:
    device: torch.device
    seed: int
    logger: object


def start_job(log: str | None, threads: int = 1, seed: int = 0, device: str = "cpu", n_gpus: int = 0,
              lock_dir: str = ".wsss/gpu-locks") -> Job:
    """Configure a job; ``n_gpus`` > 0 takes a GPU lease (local runs) before CUDA initialises.

    In a rank process of a multi-process job (:mod:`~wsss_core.engine.distributed`) the launcher already holds the
    lease: the device is the rank's (``cuda:rank`` or the CPU), the job's ``threads`` are shared by the ranks, and
    ranks other than 0 log warnings and errors only (tagged with the rank)."""
    r = rank_info()
    if r.distributed:
        logger = setup_job_logging(log, logging.INFO if r.main else logging.WARNING, tag=f"[rank {r.rank}/{r.world}] ")
        threads = max(1, int(threads) // r.world)
    else:
        logger = setup_job_logging(log)
    torch.set_num_threads(max(1, int(threads)))
    seed_everything(seed)
    if is_worker():
        dev = rank_device()
    else:
        dev = select_device(device, n_gpus=n_gpus, lock_dir=lock_dir) if n_gpus > 0 else torch.device("cpu")
    logger.info("job pid=%d host=%s torch=%s device=%s threads=%d seed=%d CUDA_VISIBLE_DEVICES=%s%s",
                os.getpid(), platform.node(), torch.__version__, dev, threads, seed,
                os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
                f" rank {r.rank} of {r.world}" if r.distributed else "")
    return Job(device=dev, seed=seed, logger=logger)
