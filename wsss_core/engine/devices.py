"""Device selection and the local GPU lease.

Snakemake counts ``gpu`` resources but does not say *which* GPU a job gets. For local runs with
``--resources gpu=N`` each job that wants GPUs takes an exclusive ``flock`` on one lock file per
device (``<lock_dir>/gpu<i>.lock``) and sets ``CUDA_VISIBLE_DEVICES`` to the devices it holds, so
concurrent jobs never share a GPU. Locks are released when the process exits, even on SIGKILL.
Under SLURM (``SLURM_JOB_ID`` set) the scheduler already isolates GPUs and no lease is taken.

CUDA is initialised lazily by torch, so the lease must be taken before the first CUDA call.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

_HELD: list = []  # open lock files of this process (kept alive until exit)


def visible_gpus() -> list[str]:
    """Physical GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def lease_gpus(n: int, lock_dir: str | os.PathLike, timeout: float = 24 * 3600, poll: float = 2.0) -> list[str]:
    """Take exclusive locks on ``n`` distinct GPUs and restrict this process to them.

    Returns the physical ids held (and sets ``CUDA_VISIBLE_DEVICES``). Returns ``[]`` when ``n == 0``,
    under SLURM, or when no GPU is visible. Blocks (polling) while all GPUs are held by other jobs.
    """
    if n <= 0 or os.environ.get("SLURM_JOB_ID"):
        return []
    gpus = visible_gpus()
    if not gpus:
        return []
    if n > len(gpus):
        raise RuntimeError(f"job wants {n} GPUs but only {len(gpus)} are visible ({gpus})")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        held = []
        for gpu in gpus:
            fh = open(lock_dir / f"gpu{gpu}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}\n")
            fh.flush()
            held.append((gpu, fh))
            if len(held) == n:
                break
        if len(held) == n:
            _HELD.extend(fh for _, fh in held)
            ids = [g for g, _ in held]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            return ids
        for _, fh in held:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {n} free GPU(s) among {gpus} after {timeout:.0f} s (locks in {lock_dir})")
        time.sleep(poll)


def release_gpus() -> None:
    """Release the locks held by this process (normally left to process exit)."""
    while _HELD:
        fh = _HELD.pop()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def select_device(preference: str = "auto", n_gpus: int = 1, lock_dir: str | os.PathLike = ".wsss/gpu-locks"):
    """Return the ``torch.device`` for a job: CUDA (after taking a GPU lease) when wanted and available, else CPU.

    ``preference``: ``auto`` | ``cpu`` | ``cuda`` (``cuda`` without a GPU is an error).
    """
    import torch

    if preference == "cpu":
        return torch.device("cpu")
    if preference not in ("auto", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {preference!r}")
    lease_gpus(n_gpus, lock_dir)
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if preference == "cuda":
        raise RuntimeError("device: cuda was requested but CUDA is not available")
    return torch.device("cpu")
