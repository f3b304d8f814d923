"""Common start-up of a pipeline job: logging to the job's log file, threads, seeds, device (with GPU lease)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from .devices import select_device
from .logs import setup_job_logging
from .trainer import seed_everything


@dataclass
class Job:
    device: torch.device
    seed: int
    logger: object


def start_job(log: str | None, threads: int = 1, seed: int = 0, device: str = "cpu", n_gpus: int = 0,
              lock_dir: str = ".wsss/gpu-locks") -> Job:
    """Configure a job; ``n_gpus`` > 0 takes a GPU lease (local runs) before CUDA initialises."""
    logger = setup_job_logging(log)
    torch.set_num_threads(max(1, int(threads)))
    seed_everything(seed)
    dev = select_device(device, n_gpus=n_gpus, lock_dir=lock_dir) if n_gpus > 0 else torch.device("cpu")
    logger.info("job pid=%d host=%s torch=%s device=%s threads=%d seed=%d CUDA_VISIBLE_DEVICES=%s",
                os.getpid(), platform.node(), torch.__version__, dev, threads, seed,
                os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
    return Job(device=dev, seed=seed, logger=logger)
